"""Tests of the Triton SSD backend (m4v.ops.ssd_triton) against float64 references written here.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (small shapes); with one, the
same small cases run compiled, plus full-size bf16 checks.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernels are decorated

pytest.importorskip("triton")

_KERNEL_MODULES = [
    "m4v.ops.triton_ssd.reductions",
    "m4v.ops.triton_ssd.dt_kernels",
    "m4v.ops.triton_ssd.chunk_state",
    "m4v.ops.triton_ssd.state_passing",
    "m4v.ops.triton_ssd.chunk_scan",
    "m4v.ops.triton_ssd.chunk_scan_bwd",
    "m4v.ops.triton_ssd.launch",
    "m4v.ops.ssd_triton",
]
if os.environ.get("TRITON_INTERPRET") == "1":
    # another test module may have imported (and so compiled-decorated) the kernels before the env var was set
    for _name in _KERNEL_MODULES:
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

from conftest import OpNames  # noqa: E402

from m4v.ops.ssd_triton import ssd_triton  # noqa: E402
from m4v.ops.triton_ssd import launch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def ref_sequential(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None):
    """Step-by-step recurrence (any dtype): h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    d = dt if dt_bias is None else dt + dt_bias
    if dt_softplus:
        d = F.softplus(d)
    bh = B.repeat_interleave(h // g, dim=2)
    ch = C.repeat_interleave(h // g, dim=2)
    state = torch.zeros(b, h, p, n, dtype=x.dtype, device=x.device) if initial_state is None else initial_state
    ys = []
    for t in range(l):
        dtt = d[:, t, :, None, None]
        state = torch.exp(dtt * A[:, None, None]) * state + dtt * x[:, t, :, :, None] * bh[:, t, :, None, :]
        y = (state * ch[:, t, :, None, :]).sum(-1)
        if D is not None:
            y = y + x[:, t] * (D[:, None] if D.dim() == 1 else D)
        ys.append(y)
    y = torch.stack(ys, dim=1)
    if z is not None:
        y = y * F.silu(z)
    return y, state


def ref_chunked(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None, q=64):
    """Chunked form of the same recurrence (quadratic inside chunks), for long sequences."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    d = dt if dt_bias is None else dt + dt_bias
    if dt_softplus:
        d = F.softplus(d)
    pad = (-l) % q
    nc = (l + pad) // q
    xs = F.pad(x, (0, 0, 0, 0, 0, pad)).view(b, nc, q, h, p)
    ds = F.pad(d, (0, 0, 0, pad)).view(b, nc, q, h)
    bs = F.pad(B.repeat_interleave(h // g, dim=2), (0, 0, 0, 0, 0, pad)).view(b, nc, q, h, n)
    cs = F.pad(C.repeat_interleave(h // g, dim=2), (0, 0, 0, 0, 0, pad)).view(b, nc, q, h, n)
    acum = torch.cumsum(ds * A, dim=2)  # [b, nc, q, h]
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    diff = acum.permute(0, 1, 3, 2)[..., :, None] - acum.permute(0, 1, 3, 2)[..., None, :]  # [b, nc, h, i, j]
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
    scores = torch.einsum("bcihn,bcjhn->bchij", cs, bs) * decay
    y = torch.einsum("bchij,bcjh,bcjhp->bcihp", scores, ds, xs)
    to_end = torch.exp(acum[:, :, -1:, :] - acum) * ds
    local = torch.einsum("bcjh,bcjhp,bcjhn->bchpn", to_end, xs, bs)
    state = torch.zeros(b, h, p, n, dtype=x.dtype, device=x.device) if initial_state is None else initial_state
    entering = []
    for c in range(nc):
        entering.append(state)
        state = torch.exp(acum[:, c, -1, :])[:, :, None, None] * state + local[:, c]
    ent = torch.stack(entering, dim=1)  # [b, nc, h, p, n]
    y = y + torch.einsum("bcihn,bchpn->bcihp", cs, ent) * torch.exp(acum)[..., None]
    y = y.reshape(b, nc * q, h, p)[:, :l]
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y, state


def make_inputs(b, l, h, g, p, n, *, d_per_p=False, use_z=True, softplus=True, use_init=True, seed=0,
                device=DEVICE, dtype=torch.float32):  # fmt: skip
    """Random inputs with Mamba2-like magnitudes (dt ~ 0.001..0.1 after softplus, A in -16..-1)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    x, B, C = rnd(b, l, h, p), rnd(b, l, g, n), rnd(b, l, g, n)
    A = -torch.exp(torch.rand(h, generator=gen) * 2.77).to(device)
    if softplus:
        dt0 = torch.exp(torch.rand(h, generator=gen) * (2.3 - 6.9) - 2.3)  # 0.001 .. 0.1
        dt_bias = (dt0 + torch.log(-torch.expm1(-dt0))).to(device)  # inverse softplus
        dt = rnd(b, l, h, scale=0.5)
    else:
        dt_bias = None
        dt = (torch.rand(b, l, h, generator=gen) * 0.3 + 0.01).to(device)
    D = rnd(h, p) if d_per_p else rnd(h)
    z = rnd(b, l, h, p) if use_z else None
    init = rnd(b, h, p, n, scale=0.5) if use_init else None
    args = {"x": x.to(dtype), "dt": dt, "A": A, "B": B.to(dtype), "C": C.to(dtype), "D": D,
            "z": None if z is None else z.to(dtype), "dt_bias": dt_bias, "initial_state": init}  # fmt: skip
    return args


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error ||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_case(b, l, h, g, p, n, q, *, tol=1e-4, softplus=True, **opts):
    """ssd_triton vs ref_sequential in float64: output, final state and every input gradient below tol."""
    args = make_inputs(b, l, h, g, p, n, softplus=softplus, **opts)
    ref_args = {k: (None if v is None else v.double()) for k, v in args.items()}
    torch.manual_seed(1)
    leaves_r = {k: v.detach().clone().requires_grad_(True) for k, v in ref_args.items() if v is not None}
    yr, fr = ref_sequential(**{k: leaves_r.get(k) for k in ref_args}, dt_softplus=softplus)
    gy, gf = torch.randn_like(yr), torch.randn_like(fr)
    torch.autograd.backward([yr, fr], [gy, gf])

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in args.items() if v is not None}
    y, fin = ssd_triton(**{k: leaves.get(k) for k in args}, dt_softplus=softplus, chunk_size=q,
                        return_final_state=True)  # fmt: skip
    torch.autograd.backward([y, fin], [gy.to(y.dtype), gf.float()])
    assert y.shape == (b, l, h, p) and y.dtype == args["x"].dtype
    assert fin.shape == (b, h, p, n) and fin.dtype == torch.float32
    errs = {"y": rel(y, yr), "final_state": rel(fin, fr)}
    for k, leaf in leaves.items():
        assert leaf.grad is not None, k
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == leaf.dtype, k
        errs["d" + k] = rel(leaf.grad, leaves_r[k].grad)
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"errors above {tol}: {bad} (all: {errs})"


@pytest.fixture
def tuning():
    saved = dict(launch.TUNING)
    yield launch.TUNING
    launch.TUNING.clear()
    launch.TUNING.update(saved)


def test_full_features_grouped(tuning):
    """g=2 groups of 2 heads, partial last chunk, D [h], z gate, dt bias + softplus, initial/final state."""
    tuning["min_programs"] = 1
    check_case(2, 45, 4, 2, 16, 16, 16, seed=0)


def test_head_split_and_multiblock_chunks(tuning):
    """One group of 4 heads split in 2 partial sums (HPS=2), chunk 32 = two 16-row blocks, D [h, p]."""
    tuning["min_programs"] = 4  # b * g * nc = 2 blocks -> 2 splits
    tuning["interpret_block"] = 16
    check_case(1, 50, 4, 1, 16, 16, 32, d_per_p=True, use_z=False, seed=1)


def test_plain_dt_odd_headdim_short_sequence(tuning):
    """No bias / softplus, no z, no initial state, headdim 24 (masked tile), sequence shorter than a chunk."""
    tuning["min_programs"] = 1
    tuning["interpret_block"] = 32
    check_case(1, 23, 2, 1, 24, 16, 64, softplus=False, use_z=False, use_init=False, seed=2)


def test_many_chunks(tuning):
    """Ten chunks: the state recurrence runs over more than one of its 8-chunk unrolled steps, both ways."""
    tuning["min_programs"] = 1
    check_case(1, 150, 2, 2, 16, 16, 16, use_z=False, seed=7)


def test_float16_inputs(tuning):
    """fp16 x / B / C / z (tensor-core dots, fp32 accumulation). bf16 is checked on the GPU only: the
    interpreter's numpy dot does not handle bf16."""
    tuning["min_programs"] = 1
    check_case(1, 40, 2, 1, 16, 16, 32, dtype=torch.float16, seed=6, tol=5e-3)


def test_output_only_and_no_final_state(tuning):
    """Without return_final_state the result is the tensor alone and its gradients still match."""
    tuning["min_programs"] = 1
    args = make_inputs(1, 20, 2, 2, 16, 16, use_init=False, use_z=False, seed=3)
    ref_args = {k: (None if v is None else v.double().requires_grad_(True)) for k, v in args.items()}
    yr, _ = ref_sequential(**ref_args, dt_softplus=True)
    leaves = {k: (None if v is None else v.clone().requires_grad_(True)) for k, v in args.items()}
    y = ssd_triton(**leaves, dt_softplus=True, chunk_size=16)
    assert isinstance(y, torch.Tensor)
    gy = torch.randn_like(yr)
    yr.backward(gy)
    y.backward(gy.float())
    assert rel(y, yr) < 1e-4
    for k in ("x", "dt", "B", "C", "dt_bias"):
        assert rel(leaves[k].grad, ref_args[k].grad) < 1e-4, k


def test_strided_views_match_contiguous(tuning):
    """x / B / C / z / dt as column slices of one projection output (as in a Mamba2 layer) give the same
    outputs and gradients as contiguous copies."""
    tuning["min_programs"] = 1
    b, l, h, g, p, n = 1, 20, 2, 1, 16, 16
    gen = torch.Generator().manual_seed(8)
    width = 2 * h * p + 2 * g * n + h
    proj = torch.randn(b, l, width, generator=gen).to(DEVICE)
    A = -torch.rand(h, generator=gen).to(DEVICE) - 0.5
    gy = torch.randn(b, l, h, p, generator=gen).to(DEVICE)

    def run(contiguous: bool):
        leaf = proj.clone().requires_grad_(True)
        cuts = [h * p, h * p, g * n, g * n, h]
        z, x, B, C, dt = torch.split(leaf, cuts, dim=-1)
        parts = [z.reshape(b, l, h, p), x.reshape(b, l, h, p), B.reshape(b, l, g, n), C.reshape(b, l, g, n), dt]
        if contiguous:
            parts = [t.contiguous() for t in parts]
        else:
            assert not parts[1].is_contiguous() and not parts[4].is_contiguous()
        z, x, B, C, dt = parts
        y = ssd_triton(x, dt, A, B, C, z=z, dt_softplus=True, chunk_size=16)
        y.backward(gy)
        return y.detach(), leaf.grad

    y1, g1 = run(False)
    y2, g2 = run(True)
    assert rel(y1, y2) < 1e-6 and rel(g1, g2) < 1e-6


def test_custom_ops_pass_opcheck(tuning):
    """The forward / backward custom ops: schema, fake (meta) shapes, autograd registration (torch.library.opcheck)."""
    tuning["min_programs"] = 1
    a = make_inputs(1, 20, 2, 1, 16, 16, seed=4)
    B, C = a["B"], a["C"]
    args = (a["x"], a["dt"], a["A"], B, C, a["D"], a["z"], a["dt_bias"], a["initial_state"], True, 16)
    leaves = tuple(t.clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(torch.ops.m4v.ssd_triton_fwd.default, leaves,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))  # fmt: skip
    out = torch.ops.m4v.ssd_triton_fwd.default(*args)
    bwd = (torch.randn_like(out[0]), None, *args[:8], *out[2:], True, 16, True)
    torch.library.opcheck(torch.ops.m4v.ssd_triton_bwd.default, bwd, test_utils=("test_schema", "test_faketensor"))


def test_custom_op_without_final_state_passes_opcheck(tuning):
    """want_final=False: the forward op returns an empty final state (no copy launched), fake shapes agree."""
    tuning["min_programs"] = 1
    a = make_inputs(1, 20, 2, 1, 16, 16, seed=4, use_init=False)
    args = (a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["dt_bias"], None, True, 16, False)
    leaves = tuple(t.clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(torch.ops.m4v.ssd_triton_fwd.default, leaves,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))  # fmt: skip
    assert torch.ops.m4v.ssd_triton_fwd.default(*args)[1].numel() == 0


def test_eager_calls_skip_custom_op_dispatch(tuning):
    """Eager calls run the kernels through the autograd.Function (the custom ops' dispatch is host time at short
    sequences); its output and gradients equal the custom op's, which torch.compile uses."""
    tuning["min_programs"] = 1
    a = make_inputs(1, 24, 2, 1, 16, 16, seed=9)
    runs = []
    for path in ("eager", "custom_op"):
        leaves = {k: (None if v is None else v.clone().requires_grad_(True)) for k, v in a.items()}
        with OpNames() as ops:
            if path == "eager":
                y, fin = ssd_triton(**leaves, dt_softplus=True, chunk_size=16, return_final_state=True)
            else:
                k = leaves
                y, fin, *_ = torch.ops.m4v.ssd_triton_fwd(k["x"], k["dt"], k["A"], k["B"], k["C"], k["D"], k["z"],
                                                          k["dt_bias"], k["initial_state"], True, 16, True)  # fmt: skip
            (y.square().sum() + fin.sum()).backward()
        # eager: the kernels' buffers are allocated in plain sight (inside a custom op the mode sees only the op)
        want = {"aten.empty"} if path == "eager" else {"m4v.ssd_triton_fwd", "m4v.ssd_triton_bwd"}
        assert ops.custom() | (ops.names & {"aten.empty"}) == want, ops.names
        runs.append((y.detach(), fin.detach(), {k: v.grad for k, v in leaves.items() if v is not None}))
    (y0, f0, g0), (y1, f1, g1) = runs
    assert torch.equal(y0, y1) and torch.equal(f0, f1)
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k


def test_torch_compile_fullgraph_matches_eager(tuning):
    """torch.compile(fullgraph=True) traces the scan as opaque custom ops (no graph break): same output and
    gradients as eager (aot_eager backend, so the Triton kernels run as in eager)."""
    tuning["min_programs"] = 1
    args = make_inputs(1, 24, 2, 1, 16, 16, seed=5)

    def f(**kw):
        y, fin = ssd_triton(**kw, dt_softplus=True, chunk_size=16, return_final_state=True)
        return (y.float().square().sum() + fin.sum()) * 1.0

    results = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        leaves = {k: (None if v is None else v.clone().requires_grad_(True)) for k, v in args.items()}
        loss = fn(**leaves)
        loss.backward()
        results.append((loss.detach(), {k: v.grad for k, v in leaves.items() if v is not None}))
    (l0, g0), (l1, g1) = results
    assert rel(l1, l0) < 1e-6
    for k in g0:
        assert rel(g1[k], g0[k]) < 1e-6, k


def test_small_problems_skip_block_tuning(tuning, monkeypatch):
    """Below min_tune_elements the first block config is used untimed (timing compiles every config); above it
    the tuner picks, once per key."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "_TUNED", {})
    timed = []

    def fake_tune(full, cfgs, run):  # noqa: ANN001, ANN202
        timed.append(full)
        return cfgs[-1]

    monkeypatch.setattr(launch, "_tune", fake_tune)
    tuning["autotune"] = True
    cfgs = [{"BM": 64, "num_warps": 4}, {"BM": 32, "num_warps": 8}]
    limit = tuning["min_tune_elements"]
    assert launch._pick("scan", ("k",), cfgs, 64, None, limit - 1) == cfgs[0]
    assert timed == []
    assert launch._pick("scan", ("k",), cfgs, 64, None, limit) == cfgs[1]
    assert launch._pick("scan", ("k",), cfgs, 64, None, 4 * limit) == cfgs[1]
    assert len(timed) == 1


def test_chunked_reference_matches_sequential():
    """The chunked float64 reference used by the GPU tests agrees with the step-by-step recurrence."""
    args = {k: (None if v is None else v.double()) for k, v in make_inputs(2, 37, 4, 2, 8, 8, device="cpu").items()}
    y1, f1 = ref_sequential(**args, dt_softplus=True)
    y2, f2 = ref_chunked(**args, dt_softplus=True, q=16)
    assert rel(y2, y1) < 1e-12 and rel(f2, f1) < 1e-12


def test_bad_arguments_raise_value_error():
    args = make_inputs(1, 8, 2, 1, 16, 16, use_z=False, use_init=False)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_triton(**args, chunk_size=24)
    with pytest.raises(ValueError, match="x must be"):
        ssd_triton(**{**args, "x": args["x"].double()}, chunk_size=16)
    with pytest.raises(ValueError, match="B must"):
        ssd_triton(**{**args, "B": args["B"][:, :, :, :8].repeat(1, 1, 3, 1)}, chunk_size=16)
    with pytest.raises(ValueError, match="dt must"):
        ssd_triton(**{**args, "dt": args["dt"][:, :4]}, chunk_size=16)


def test_registered_as_triton_backend():
    registry = pytest.importorskip("m4v.ops.registry")
    assert "triton" in registry.list_ssd_backends()
    cpu = torch.zeros(1, 1, 1, 16)
    assert registry.select_ssd_backend(cpu).name != "triton"


# ---------------------------------------------------------------- full-size checks on a GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("l", "h", "g", "n"),
    [(3968, 30, 30, 64), (2000, 30, 1, 128)],
    ids=["paper-g30-n64", "g1-n128-partial-chunk"],
)
def test_gpu_bf16_full_shape(l, h, g, n):
    """bf16 at the paper's width (30 heads x 64) vs a float64 chunked reference: rel RMS < 5e-3 / 1e-2."""
    args = make_inputs(1, l, h, g, 64, n, seed=4, dtype=torch.bfloat16)
    ref_leaves = {k: v.double().requires_grad_(True) for k, v in args.items() if v is not None}
    yr, fr = ref_chunked(**{k: ref_leaves.get(k) for k in args}, dt_softplus=True, q=256)
    gy, gf = torch.randn_like(yr), torch.randn_like(fr)
    torch.autograd.backward([yr, fr], [gy, gf])
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in args.items() if v is not None}
    y, fin = ssd_triton(**{k: leaves.get(k) for k in args}, dt_softplus=True, chunk_size=256,
                        return_final_state=True)  # fmt: skip
    torch.autograd.backward([y, fin], [gy.to(torch.bfloat16), gf.float()])
    assert rel(y, yr) < 5e-3 and rel(fin, fr) < 5e-3, (rel(y, yr), rel(fin, fr))
    errs = {k: rel(leaves[k].grad, ref_leaves[k].grad) for k in leaves}
    assert all(e < 1e-2 for e in errs.values()), errs


@gpu
@pytest.mark.gpu
def test_gpu_fp32_matches_float64():
    """float32 inputs use exact fp32 dots: agreement with float64 to 1e-4 at a multi-chunk size."""
    check_case(2, 700, 8, 2, 64, 64, 128, seed=5, tol=1e-4)


def test_inference_calls_skip_autograd_and_match(tuning):
    """Under no_grad the op runs its forward without the autograd.Function: same output and final state."""
    tuning["min_programs"] = 1
    a = make_inputs(1, 40, 2, 1, 16, 16, seed=11)
    leaves = {k: (None if v is None else v.clone().requires_grad_(True)) for k, v in a.items()}
    y0, f0 = ssd_triton(**leaves, dt_softplus=True, chunk_size=16, return_final_state=True)
    with torch.no_grad():
        y1, f1 = ssd_triton(**a, dt_softplus=True, chunk_size=16, return_final_state=True)
    assert y0.grad_fn is not None and y1.grad_fn is None
    assert torch.equal(y0.detach(), y1) and torch.equal(f0.detach(), f1)
