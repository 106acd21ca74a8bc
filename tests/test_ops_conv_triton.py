"""Tests of the fused Triton causal conv (m4v.ops.conv_triton) against float64 autograd of the torch path.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (small shapes); with one, the same small
cases run compiled, plus full-size bf16 checks. The torch path itself is checked against loops in test_ops_conv.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

from m4v.ops.conv import causal_conv1d

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
if HAS_TRITON and not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernels are decorated
    if "m4v.ops.conv_triton" in sys.modules:  # imported (compiled-decorated) by an earlier test module
        importlib.reload(sys.modules["m4v.ops.conv_triton"])
if HAS_TRITON:
    from m4v.ops import conv_triton as ct

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and CUDA), reason="needs a CUDA device and triton")
DEV = torch.device("cuda" if CUDA else "cpu")
F64 = torch.float64


def rand(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(DEV, dtype)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype with the same strides (``Tensor.to`` would make a strided slice contiguous)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=dtype, device=t.device)
    return out.copy_(t)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of a against the reference b."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_case(b: int, l: int, d: int, k: int, seed: int, strided: bool, masked: bool, dtype: torch.dtype = F64):
    """x (a channel slice of a wider buffer when strided), weight, bias, mask, output grad."""
    width = d + 7 if strided else d
    x = rand(b, l, width, seed=seed, dtype=dtype)[:, :, 3 : 3 + d] if strided else rand(b, l, d, seed=seed, dtype=dtype)
    w = rand(d, k, seed=seed + 1, dtype=dtype)
    bias = rand(d, seed=seed + 2, dtype=dtype)
    g = rand(b, l, d, seed=seed + 3, dtype=dtype)
    mask = None
    if masked:
        mask = torch.rand(b, l, generator=torch.Generator().manual_seed(seed + 4)) > 0.3
        mask[0, :2] = False  # a left-padded start
        mask = mask.to(DEV)
    return x, w, bias, mask, g


def run(fn, x, w, bias, mask, g, activation="silu", use_bias=True):  # noqa: ANN001, ANN201
    """Output and gradients (x, w, bias) of fn, with fresh leaves of the given tensors."""
    leaves = [t.detach().requires_grad_(True) for t in (x, w, bias)]
    out = fn(leaves[0], leaves[1], leaves[2] if use_bias else None, activation=activation, seq_mask=mask)
    out.backward(g.to(out.dtype))
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return out, grads


@needs_triton
@pytest.mark.parametrize(
    "b,l,d,k,use_bias,activation,strided,masked",
    [
        (2, 37, 20, 4, True, "silu", True, True),
        (1, 50, 24, 4, False, "silu", False, False),
        (2, 29, 9, 4, True, None, True, False),
        (1, 21, 16, 3, True, "swish", False, True),
        (2, 13, 5, 2, True, "silu", True, False),
        (1, 9, 4, 1, False, None, False, True),
        (1, 3, 6, 4, True, "silu", False, False),  # shorter than the kernel
        (3, 1, 4, 4, True, "silu", True, True),  # one token
    ],
)
def test_fp32_matches_float64_autograd(b, l, d, k, use_bias, activation, strided, masked):
    x, w, bias, mask, g = make_case(b, l, d, k, seed=b * 100 + l, strided=strided, masked=masked)
    ref, ref_grads = run(causal_conv1d, x, w, bias, mask, g, activation, use_bias)
    x32 = cast(x, torch.float32)
    assert x32.is_contiguous() != strided
    out, grads = run(ct.causal_conv1d_triton, x32, w.float(), bias.float(), mask, g, activation, use_bias)
    assert out.shape == (b, l, d) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")
    if masked:  # masked positions: zero output, zero input gradient
        assert torch.all(out[~mask] == 0) and torch.all(grads[0][~mask] == 0)


@needs_triton
@pytest.mark.parametrize("b,l,d,masked,fast", [(1, 4, 2, False, False), (2, 9, 3, True, True)])
def test_float64_gradcheck(b, l, d, masked, fast):
    """Kernel backward against finite differences of the kernel forward (float64)."""
    x, w, bias, mask, _ = make_case(b, l, d, 4, seed=7, strided=False, masked=masked)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, bias)]

    def fn(a, b_, c):  # noqa: ANN001, ANN202
        return ct.causal_conv1d_triton(a, b_, c, activation="silu", seq_mask=mask)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


@needs_triton
@pytest.mark.parametrize(
    "cfg",
    [
        {"BLOCK_S": 1, "BLOCK_D": 16, "min_rows": 4, "max_rows": 4},
        {"BLOCK_S": 2, "BLOCK_D": 32, "min_rows": 8, "max_rows": 8},
        {"BLOCK_S": 8, "BLOCK_D": 16, "min_rows": 4, "max_rows": 64},
    ],
)
def test_stream_layouts_agree(cfg, monkeypatch):
    """Streams of a few rows, many per program, channel blocks narrower than d: same result as the torch path."""
    for table in (ct.FWD_CONFIG, ct.BWD_CONFIG):
        for key, value in cfg.items():
            monkeypatch.setitem(table, key, value)
    x, w, bias, mask, g = make_case(2, 30, 20, 4, seed=3, strided=True, masked=True)
    ref, ref_grads = run(causal_conv1d, x, w, bias, mask, g)
    out, grads = run(ct.causal_conv1d_triton, x, w, bias, mask, g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_tolerance(dtype):
    """Half inputs: fp32 accumulation; compare with the float64 path on the same (rounded) values."""
    x, w, bias, mask, g = make_case(2, 40, 24, 4, seed=11, strided=True, masked=True, dtype=dtype)
    ref, ref_grads = run(causal_conv1d, x.double(), w.double(), bias.double(), mask, g.double())
    out, grads = run(ct.causal_conv1d_triton, x, w, bias, mask, g)
    assert out.dtype == dtype and all(t.dtype == dtype for t in grads)
    assert rel(out, ref) < 5e-3
    for got, want in zip(grads, ref_grads):
        assert rel(got, want) < 1e-2


@needs_triton
def test_left_padding_equals_unpadded():
    x, w, bias, _, _ = make_case(1, 10, 6, 4, seed=9, strided=False, masked=False, dtype=torch.float32)
    mask = torch.ones(1, 10, dtype=torch.bool, device=DEV)
    mask[0, :3] = False
    padded = ct.causal_conv1d_triton(x, w, bias, activation="silu", seq_mask=mask)
    alone = ct.causal_conv1d_triton(x[:, 3:].contiguous(), w, bias, activation="silu")
    torch.testing.assert_close(padded[:, 3:], alone, rtol=1e-6, atol=1e-6)
    assert torch.all(padded[:, :3] == 0)


@needs_triton
@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"weight": torch.zeros(3, 5)}, "weight"),
        ({"weight": torch.zeros(4, 4)}, "weight"),
        ({"bias": torch.zeros(2)}, "bias"),
        ({"activation": "relu"}, "activation"),
        ({"seq_mask": torch.ones(2, 4)}, "seq_mask"),
        ({"x": torch.zeros(2, 5, 3, dtype=torch.int32)}, "x"),
    ],
)
def test_bad_arguments(kwargs, field):
    args = {"x": torch.zeros(2, 5, 3), "weight": torch.zeros(3, 4), **kwargs}
    args = {key: v.to(DEV) if isinstance(v, torch.Tensor) else v for key, v in args.items()}
    with pytest.raises(ValueError, match=field):
        ct.causal_conv1d_triton(**args)


def test_cpu_dispatch_uses_torch_path(monkeypatch):
    """On CPU tensors causal_conv1d never reaches Triton (float64 stays exact against a float64 loop-free check)."""
    x, w, bias, mask, _ = make_case(1, 6, 3, 4, seed=2, strided=False, masked=True)
    if HAS_TRITON:
        monkeypatch.setattr(ct, "causal_conv1d_triton", lambda *a, **k: pytest.fail("dispatched to Triton"))
    out = causal_conv1d(x.cpu(), w.cpu(), bias.cpu(), activation=None, seq_mask=mask.cpu())
    m = mask.cpu().double()[..., None]
    xm = torch.nn.functional.pad(x.cpu() * m, (0, 0, 3, 0))
    want = sum(w.cpu()[:, j] * xm[:, j : j + 6] for j in range(4)) + bias.cpu()
    torch.testing.assert_close(out, want * m, rtol=1e-12, atol=1e-12)


@needs_cuda
def test_cuda_dispatch_and_disable(monkeypatch):
    x, w, bias, mask, _ = make_case(2, 300, 64, 4, seed=4, strided=True, masked=True, dtype=torch.bfloat16)
    fused = causal_conv1d(x, w, bias, activation="silu", seq_mask=mask)
    torch.testing.assert_close(fused, ct.causal_conv1d_triton(x, w, bias, activation="silu", seq_mask=mask))
    monkeypatch.setenv("M4V_DISABLE_TRITON", "1")
    monkeypatch.setattr(ct, "causal_conv1d_triton", lambda *a, **k: pytest.fail("dispatched to Triton"))
    plain = causal_conv1d(x, w, bias, activation="silu", seq_mask=mask)
    assert rel(fused, plain) < 1e-2


@needs_cuda
@pytest.mark.gpu
def test_full_size_bf16():
    """The MM-DiM layer's conv: 15488 tokens x 5760 channels, x a slice of the 7710-wide in_proj output."""
    b, l, d, width = 1, 15488, 5760, 7710
    zxbcdt = rand(b, l, width, seed=21, dtype=torch.bfloat16)
    x = zxbcdt[:, :, 1920 : 1920 + d]
    w = (rand(d, 4, seed=22) * 0.5).bfloat16()
    bias = (rand(d, seed=23) * 0.5).bfloat16()
    g = rand(b, l, d, seed=24, dtype=torch.bfloat16)
    ref, ref_grads = run(causal_conv1d, x.double(), w.double(), bias.double(), None, g.double())
    out, grads = run(ct.causal_conv1d_triton, x, w, bias, None, g)
    assert rel(out, ref) < 5e-3
    for got, want in zip(grads, ref_grads):
        assert rel(got, want) < 1e-2


@needs_triton
def test_custom_ops_opcheck_and_torch_compile_fullgraph():
    """The kernels run as torch.library custom ops: opcheck (schema, fake shapes, autograd registration), and
    torch.compile(fullgraph=True) traces the conv without a graph break, with eager's output and gradients."""
    x, w, bias, mask, g = make_case(2, 9, 16, 4, seed=30, strided=False, masked=True, dtype=torch.float32)
    args = (x.requires_grad_(True), w.requires_grad_(True), bias.requires_grad_(True), mask, True)
    torch.library.opcheck(torch.ops.m4v.causal_conv1d_triton_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))  # fmt: skip
    torch.library.opcheck(torch.ops.m4v.causal_conv1d_triton_bwd.default, (*(t.detach() for t in args[:3]), mask,
                          True, g), test_utils=("test_schema", "test_faketensor"))  # fmt: skip

    def f(x, w, b):  # noqa: ANN001, ANN202
        return ct.causal_conv1d_triton(x, w[:, 1:], b, "silu", mask)

    grads = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, bias)]
        out = fn(*leaves)
        out.backward(g)
        grads.append([out.detach(), *(t.grad for t in leaves)])
    for a, b in zip(*grads):
        assert rel(b, a) < 1e-6


@needs_triton
def test_eager_calls_skip_custom_op_dispatch():
    """Eager calls run the kernels through an autograd.Function (m4v.ops.eager; the ops' dispatch is host time),
    with the custom op's output and gradients bit for bit."""
    from conftest import assert_eager_equals_custom_op

    x, w, bias, mask, g = make_case(2, 9, 16, 4, seed=31, strided=True, masked=True, dtype=torch.float32)
    assert_eager_equals_custom_op(
        lambda x, w, b: ct.causal_conv1d_triton(x, w, b, "silu", mask),
        lambda x, w, b: torch.ops.m4v.causal_conv1d_triton_fwd(x, w, b, mask, True),
        (x, w, bias), g, {"m4v.causal_conv1d_triton_fwd", "m4v.causal_conv1d_triton_bwd"},
    )
