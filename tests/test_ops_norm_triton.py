"""Tests of the gated RMSNorm: torch reference (m4v.ops.norm) and fused Triton kernel (m4v.ops.norm_triton).

The torch reference is checked bit-for-bit against GatedRMSNorm and against a per-group float64 loop; the
Triton kernel against float64 autograd of that loop. Without a GPU the kernels run under TRITON_INTERPRET=1 on
CPU tensors (small shapes); with one, the same cases run compiled, plus a full-size bf16 check.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys

import pytest
import torch

from m4v.layers.norms import GatedRMSNorm
from m4v.ops.norm import gated_rms_norm, gated_rms_norm_torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
if HAS_TRITON and not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernels are decorated
    if "m4v.ops.norm_triton" in sys.modules:  # imported (compiled-decorated) by an earlier test module
        importlib.reload(sys.modules["m4v.ops.norm_triton"])
if HAS_TRITON:
    from m4v.ops import norm_triton as nt

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and CUDA), reason="needs a CUDA device and triton")
DEV = torch.device("cuda" if CUDA else "cpu")
F64 = torch.float64
# float64 agreement: exact to rounding under the interpreter (numpy); the compiled GPU kernel measured 2e-11
# (tile layouts) and 1.3e-8 relative (zero gate, where 1 / sqrt(eps) amplifies rsqrt's rounding) on the H100
TOL64 = 1e-7 if CUDA else 1e-12


def rand(*shape: int, seed: int, dtype: torch.dtype = F64, device: torch.device = DEV) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(device, dtype)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype with the same strides (``Tensor.to`` would make a strided slice contiguous)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=dtype, device=t.device)
    return out.copy_(t)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def loop_reference(y: torch.Tensor, z: torch.Tensor, w: torch.Tensor, group: int, eps: float) -> torch.Tensor:
    """Per token and group: g = y * z * sigmoid(z); g / sqrt(mean(g^2) + eps) * w (float64, differentiable)."""
    g = y * z / (1 + torch.exp(-z))
    outs = []
    for c0 in range(0, y.shape[-1], group):
        gc = g[..., c0 : c0 + group]
        ms = (gc * gc).sum(-1, keepdim=True) / group
        outs.append(gc / torch.sqrt(ms + eps) * w[c0 : c0 + group])
    return torch.cat(outs, -1)


def make_case(shape: tuple[int, ...], seed: int, dtype: torch.dtype = F64, strided: bool = True):
    """y, z (a slice of a wider buffer when strided), weight, output grad."""
    d = shape[-1]
    y = rand(*shape, seed=seed, dtype=dtype)
    if strided:
        z = rand(*shape[:-1], d + 9, seed=seed + 1, dtype=dtype)[..., 4 : 4 + d]
    else:
        z = rand(*shape, seed=seed + 1, dtype=dtype)
    w = (1 + 0.5 * rand(d, seed=seed + 2)).to(dtype)
    g = rand(*shape, seed=seed + 3, dtype=dtype)
    return y, z, w, g


def run(fn, y, z, w, g, group, eps=1e-5):  # noqa: ANN001, ANN201
    leaves = [t.detach().requires_grad_(True) for t in (y, z, w)]
    out = fn(*leaves, group, eps)
    out.backward(g.to(out.dtype))
    return out, [t.grad for t in leaves]


# --- torch reference ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [8, 24])
def test_torch_reference_is_gated_rms_norm_module(dtype, group):
    module = GatedRMSNorm(24, group_size=group, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(rand(24, seed=1, device=torch.device("cpu")))
    module = module.to(dtype)
    cpu = torch.device("cpu")
    y, z = rand(3, 5, 24, seed=2, dtype=dtype, device=cpu), rand(3, 5, 24, seed=3, dtype=dtype, device=cpu)
    out = gated_rms_norm_torch(y, z, module.weight, group, module.eps)
    assert out.dtype == dtype
    assert torch.equal(out, module(y, z))


def test_torch_reference_matches_loop():
    y, z, w, g = make_case((2, 7, 12), seed=4)
    cpu = [t.cpu() for t in (y, z, w, g)]
    out, grads = run(gated_rms_norm_torch, *cpu, group=4)
    ref, ref_grads = run(loop_reference, *cpu, group=4)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # each group of the normalised gate (weight 1) has unit mean square, up to eps
    unit = gated_rms_norm_torch(cpu[0], cpu[1], torch.ones(12, dtype=F64), 4, 0.0)
    torch.testing.assert_close(unit.unflatten(-1, (3, 4)).pow(2).mean(-1), torch.ones(2, 7, 3, dtype=F64))


@pytest.mark.parametrize(
    "shape_z,w_shape,group,field",
    [
        ((2, 5), (6,), 3, "z"),
        ((2, 6), (5,), 3, "weight"),
        ((2, 6), (6,), 4, "group_size"),
        ((2, 6), (6,), 0, "group_size"),
    ],
)
def test_bad_arguments(shape_z, w_shape, group, field):
    y, z, w = torch.zeros(2, 6), torch.zeros(*shape_z), torch.zeros(*w_shape)
    for fn in (gated_rms_norm, gated_rms_norm_torch) + ((nt.gated_rms_norm,) if HAS_TRITON else ()):
        with pytest.raises(ValueError, match=field):
            fn(y, z, w, group)


def test_cpu_dispatch_uses_torch_path(monkeypatch):
    if HAS_TRITON:
        monkeypatch.setattr(nt, "gated_rms_norm", lambda *a, **k: pytest.fail("dispatched to Triton"))
    y, z, w, _ = make_case((2, 3, 8), seed=5)
    y, z, w = y.cpu().float(), z.cpu().float(), w.cpu().float()
    assert torch.equal(gated_rms_norm(y, z, w, 4), gated_rms_norm_torch(y, z, w, 4))


# --- Triton kernel -----------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    "shape,group,strided",
    [
        ((2, 37, 48), 16, True),
        ((3, 40), 40, True),  # one group, not a power of two
        ((2, 5, 24), 6, False),
        ((1, 1, 64), 64, True),
        ((4, 3, 2, 32), 8, False),
    ],
)
def test_fp32_matches_float64_autograd(shape, group, strided):
    y, z, w, g = make_case(shape, seed=len(shape) * 10 + shape[-1], strided=strided)
    ref, ref_grads = run(loop_reference, y, z, w, g, group)
    z32 = cast(z, torch.float32)
    assert z32.is_contiguous() != (strided and shape[-1] > 1 and math.prod(shape[:-1]) > 1)
    out, grads = run(nt.gated_rms_norm, y.float(), z32, w.float(), g, group)
    assert out.shape == y.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("y", "z", "weight"), grads, ref_grads):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


@needs_triton
def test_float64_gradcheck():
    y, z, w, _ = make_case((2, 3, 8), seed=6)
    leaves = [t.clone().requires_grad_(True) for t in (y, z, w)]
    assert torch.autograd.gradcheck(lambda a, b, c: nt.gated_rms_norm(a, b, c, 4), leaves, eps=1e-6, atol=1e-7)


@needs_triton
@pytest.mark.parametrize("elements,programs", [(16, 1), (16, 12), (64, 4)])
def test_tile_layouts_agree(elements, programs, monkeypatch):
    """Small tiles: many row blocks per program, one or several programs per group: same result."""
    for table in (nt.FWD_CONFIG, nt.BWD_CONFIG):
        monkeypatch.setitem(table, "elements", elements)
    monkeypatch.setitem(nt.BWD_CONFIG, "programs_per_sm", programs)
    y, z, w, g = make_case((3, 11, 32), seed=8)
    ref, ref_grads = run(loop_reference, y, z, w, g, 8)
    out, grads = run(nt.gated_rms_norm, y, z, w, g, 8)
    torch.testing.assert_close(out, ref, rtol=TOL64, atol=TOL64)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=max(TOL64, 1e-10), atol=TOL64)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_tolerance(dtype):
    y, z, w, g = make_case((2, 20, 48), seed=12, dtype=dtype)
    ref, ref_grads = run(loop_reference, y.double(), z.double(), w.double(), g.double(), 16)
    out, grads = run(nt.gated_rms_norm, y, z, w, g, 16)
    assert out.dtype == dtype and all(t.dtype == dtype for t in grads)
    assert rel(out, ref) < 5e-3
    for got, want in zip(grads, ref_grads):
        assert rel(got, want) < 1e-2


@needs_triton
def test_zero_gate():
    """z = 0 makes y * silu(z) = 0: zero output, and d out / d z = y * silu'(0) / sqrt(eps) * w (times the grad)."""
    y, w, g = rand(2, 16, seed=13), rand(16, seed=14), rand(2, 16, seed=15)
    z = torch.zeros(2, 16, dtype=F64, device=DEV)
    out, (dy, dz, dw) = run(nt.gated_rms_norm, y, z, w, g, 8, eps=1e-4)
    assert torch.all(out == 0) and torch.all(dy == 0) and torch.all(dw == 0)
    torch.testing.assert_close(dz, g * w * y * 0.5 / math.sqrt(1e-4), rtol=TOL64, atol=TOL64)


@needs_cuda
def test_cuda_dispatch_and_disable(monkeypatch):
    y, z, w, _ = make_case((2, 300, 128), seed=14, dtype=torch.bfloat16)
    fused = gated_rms_norm(y, z, w, 64)
    torch.testing.assert_close(fused, nt.gated_rms_norm(y, z, w, 64))
    monkeypatch.setenv("M4V_DISABLE_TRITON", "1")
    monkeypatch.setattr(nt, "gated_rms_norm", lambda *a, **k: pytest.fail("dispatched to Triton"))
    assert torch.equal(gated_rms_norm(y, z, w, 64), gated_rms_norm_torch(y, z, w, 64))


@needs_cuda
@pytest.mark.gpu
def test_full_size_bf16():
    """The MM-DiM layer's norm: 15488 tokens x 1920 channels, group 64, z a slice of the in_proj output."""
    l, d, width = 15488, 1920, 7710
    y = rand(1, l, d, seed=21, dtype=torch.bfloat16)
    z = rand(1, l, width, seed=22, dtype=torch.bfloat16)[..., :d]
    w = (1 + 0.5 * rand(d, seed=23)).bfloat16()
    g = rand(1, l, d, seed=24, dtype=torch.bfloat16)
    ref, ref_grads = run(gated_rms_norm_torch, y.double(), z.double(), w.double(), g.double(), 64)
    out, grads = run(nt.gated_rms_norm, y, z, w, g, 64)
    assert rel(out, ref) < 5e-3
    for got, want in zip(grads, ref_grads):
        assert rel(got, want) < 1e-2


@needs_triton
def test_custom_ops_opcheck_and_torch_compile_fullgraph():
    """The kernels run as torch.library custom ops: opcheck (schema, fake shapes, autograd registration), and
    torch.compile(fullgraph=True) traces the norm without a graph break, with eager's output and gradients."""
    y, z, w, g = make_case((3, 5, 24), seed=40, dtype=torch.float32)
    y2, z2 = y.reshape(-1, 24), z.reshape(-1, 24)
    args = (y2.requires_grad_(True), z2.requires_grad_(True), w.requires_grad_(True), 8, 1e-5)
    torch.library.opcheck(torch.ops.m4v.gated_rms_norm_triton_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))  # fmt: skip
    torch.library.opcheck(torch.ops.m4v.gated_rms_norm_triton_bwd.default,
                          (y2.detach(), z2.detach(), w.detach(), 8, 1e-5, g.reshape(-1, 24)),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    compiled = torch.compile(nt.gated_rms_norm, backend="aot_eager", fullgraph=True)
    out0, grads0 = run(nt.gated_rms_norm, y, z, w, g, 8)
    out1, grads1 = run(compiled, y, z, w, g, 8)
    assert rel(out1, out0) < 1e-6
    for a, b in zip(grads0, grads1):
        assert rel(b, a) < 1e-6


@needs_triton
def test_eager_calls_skip_custom_op_dispatch():
    """Eager calls run the kernel through an autograd.Function (m4v.ops.eager; the ops' dispatch is host time),
    with the custom op's output and gradients bit for bit."""
    from conftest import assert_eager_equals_custom_op

    y, z, w, g = make_case((3, 5, 24), seed=41, dtype=torch.float32)
    op = torch.ops.m4v.gated_rms_norm_triton_fwd
    assert_eager_equals_custom_op(
        lambda y, z, w: nt.gated_rms_norm(y, z, w, 8),
        lambda y, z, w: op(y.view(-1, 24), z.view(-1, 24), w, 8, 1e-5).view(y.shape),
        (y, z, w), g, {"m4v.gated_rms_norm_triton_fwd", "m4v.gated_rms_norm_triton_bwd"},
    )
