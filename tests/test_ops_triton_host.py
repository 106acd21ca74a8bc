"""Tests for m4v.ops.triton_host: integer helpers against Triton's, and the cached launches of compiled kernels."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from m4v.ops import triton_host  # noqa: E402
from m4v.ops.triton_host import CachedLaunch, cdiv, next_pow2  # noqa: E402


def test_integer_helpers_match_triton() -> None:
    for n in range(1, 3000):
        assert next_pow2(n) == triton.next_power_of_2(n), n
    for n in range(0, 600):
        for d in (1, 3, 16, 64, 256):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


class FakeCompiled:
    """Stands for Triton's CompiledKernel: ``compiled[grid]`` is a launcher taking every parameter in order."""

    def __init__(self, log: list) -> None:
        self.log = log

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        return lambda *args: self.log.append(("runner", grid, args))


class FakeJIT:
    """Stands for a @triton.jit kernel with parameters (x_ptr, n, BLOCK: constexpr)."""

    arg_names = ["x_ptr", "n", "BLOCK"]

    def __init__(self, compiles: bool = True) -> None:
        self.log: list = []
        self.compiles = compiles

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.log.append(("jit", grid, args, kwargs))
            return FakeCompiled(self.log) if self.compiles else None

        return run


def kinds(log: list) -> list[str]:
    return [entry[0] for entry in log]


def test_repeated_signature_launches_the_compiled_kernel(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setitem(triton_host.FAST_LAUNCH, "enabled", True)
    k = FakeJIT()
    launch = CachedLaunch(k)
    x = torch.zeros(64)
    launch[(4,)](x, 100, BLOCK=32, num_warps=4)
    launch[(4,)](x, 100, BLOCK=32, num_warps=4)
    assert kinds(k.log) == ["jit", "runner"]
    # the runner gets every parameter in declaration order (constexprs included), not the compile options
    assert k.log[1] == ("runner", (4, 1, 1), (x, 100, 32))
    assert launch.plain_calls == 1


@pytest.mark.parametrize(
    "change",
    ["int", "dtype", "alignment", "constexpr", "num_warps", "grid"],
)
def test_any_change_of_signature_goes_through_triton(monkeypatch, change: str) -> None:  # noqa: ANN001
    """Every property Triton specialises on (and more) is in the signature: a change compiles / looks up again."""
    monkeypatch.setitem(triton_host.FAST_LAUNCH, "enabled", True)
    k = FakeJIT()
    launch = CachedLaunch(k)
    buf = torch.zeros(64)
    args, kw, grid = [buf, 100], {"BLOCK": 32, "num_warps": 4}, (4,)
    launch[grid](*args, **kw)
    if change == "int":
        args[1] = 101
    elif change == "dtype":
        args[0] = buf.double()
    elif change == "alignment":
        args[0] = buf[1:]  # 4 bytes past a 16-byte boundary
        assert args[0].data_ptr() % 16 != 0
    elif change == "constexpr":
        kw["BLOCK"] = 64
    elif change == "num_warps":
        kw["num_warps"] = 8
    else:
        grid = (8,)
    launch[grid](*args, **kw)
    assert kinds(k.log) == ["jit", "jit"]


def test_plain_path_when_off_interpreted_or_defaulted(monkeypatch) -> None:  # noqa: ANN001
    x = torch.zeros(8)
    monkeypatch.setitem(triton_host.FAST_LAUNCH, "enabled", False)
    k = FakeJIT()
    for _ in range(2):
        CachedLaunch(k)[(1,)](x, 3, BLOCK=16)
    assert kinds(k.log) == ["jit", "jit"]
    monkeypatch.setitem(triton_host.FAST_LAUNCH, "enabled", True)
    interpreted = FakeJIT(compiles=False)  # TRITON_INTERPRET: kernel[grid](...) returns None
    launch = CachedLaunch(interpreted)
    for _ in range(2):
        launch[(1,)](x, 3, BLOCK=16)
    assert kinds(interpreted.log) == ["jit", "jit"]
    partial = FakeJIT()  # BLOCK left to a default: the call site keeps the plain path
    launch = CachedLaunch(partial)
    for _ in range(2):
        launch[(1,)](x, 3)
    assert kinds(partial.log) == ["jit", "jit"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled kernels)")
def test_cached_launches_equal_plain_launches_on_gpu(monkeypatch) -> None:  # noqa: ANN001
    """On the GPU, repeated calls of the three ops launch the cached compiled kernels (no JITFunction.run after
    the first call) and give the plain launches' outputs and gradients bit for bit."""
    from m4v.ops import conv_triton, norm_triton
    from m4v.ops.conv_triton import causal_conv1d_triton
    from m4v.ops.norm_triton import gated_rms_norm
    from m4v.ops.ssd_triton import ssd_triton
    from m4v.ops.triton_ssd import launch

    launchers = [v for m in (launch, conv_triton, norm_triton) for v in vars(m).values() if isinstance(v, CachedLaunch)]
    assert len(launchers) == 13
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    l, h, p, n, d = 1000, 4, 64, 64, 4 * 64

    def rnd(*shape: int, dtype: torch.dtype = bf, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=dev) * scale).to(dtype)

    f32 = torch.float32
    ssd_in = [rnd(1, l, h, p), rnd(1, l, h, scale=0.5), -torch.rand(h, device=dev) - 0.5, rnd(1, l, h, n),
              rnd(1, l, h, n), rnd(h, dtype=f32), rnd(1, l, h, p), rnd(h, dtype=f32, scale=0.1)]  # fmt: skip
    conv_in = [rnd(2, l, d), rnd(d, 4, dtype=torch.float32), rnd(d, dtype=torch.float32)]
    norm_in = [rnd(2, l, d), rnd(2, l, d), rnd(d, dtype=torch.float32)]
    calls = {
        "ssd": (ssd_in, lambda x, dt, A, B, C, D, z, bias: ssd_triton(x, dt, A, B, C, D=D, z=z, dt_bias=bias,
                                                                     dt_softplus=True, chunk_size=256)),  # fmt: skip
        "conv": (conv_in, lambda x, w, b: causal_conv1d_triton(x, w, b, "silu")),
        "norm": (norm_in, lambda y, z, w: gated_rms_norm(y, z, w, 64)),
    }

    def run(inputs: list[torch.Tensor], fn) -> list[torch.Tensor]:  # noqa: ANN001
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
        return [out.detach(), *(t.grad for t in leaves)]

    for name, (inputs, fn) in calls.items():
        monkeypatch.setitem(triton_host.FAST_LAUNCH, "enabled", False)
        want = run(inputs, fn)
        monkeypatch.setitem(triton_host.FAST_LAUNCH, "enabled", True)
        run(inputs, fn)  # first call of each signature: through JITFunction.run
        before = sum(k.plain_calls for k in launchers)
        for _ in range(2):
            got = run(inputs, fn)
            for a, b in zip(got, want):
                assert torch.equal(a, b), name
        assert sum(k.plain_calls for k in launchers) == before, name  # every launch went through the cache
