"""Fused Triton gated RMSNorm of the Mamba2 mixer (M4V Sec. 3.1): ``rmsnorm(y * silu(z)) * weight`` per group.

One kernel for the forward and one for the backward (gradients of y, z and weight): a program owns a tile of
token rows x one channel group, so the group's mean square is a row reduction in registers. Inputs may have
any row stride (z is usually a slice of the in_proj output); math is float32 (float64 for float64 inputs);
outputs are in y's dtype. The backward recomputes ``y * silu(z)`` and its RMS instead of saving them, and
writes per-chunk partial weight gradients that torch sums (deterministic, no atomics). See docs/kernels_layer.md.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from m4v.ops import eager
from m4v.ops.triton_host import CachedLaunch, cdiv, interpreting, next_pow2

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# elements per tile (rows x padded group); warps follow from it. programs_per_sm sizes the backward's chunks.
FWD_CONFIG: dict[str, int] = {"elements": 4096, "elements_per_warp": 512}
BWD_CONFIG: dict[str, int] = {"elements": 2048, "elements_per_warp": 256, "programs_per_sm": 8}


@triton.jit
def _add(a, b):
    return a + b


# tl.sum is a @triton.jit function that TRITON_INTERPRET=1 cannot call when triton.language was imported before
# the variable was set; tl.reduce with the standard combine function runs compiled and interpreted alike.
_SUM = getattr(getattr(tl, "standard", None), "_sum_combine", _add)


@triton.jit
def _gate(y_ptr, z_ptr, r0, r, cols, G, R, stride_y, stride_z, col0, ACC: tl.constexpr):
    """Rows r0 + r of group columns: (y, z, sigmoid(z), mask) in ACC; y/z point at row r0."""
    m = ((r0 + r) < R)[:, None] & (cols < G)[None, :]
    y = tl.load(y_ptr + r[:, None] * stride_y + col0 + cols[None, :], mask=m, other=0.0).to(ACC)
    z = tl.load(z_ptr + r[:, None] * stride_z + col0 + cols[None, :], mask=m, other=0.0).to(ACC)
    sz = 1.0 / (1.0 + tl.exp(-z))
    return y, z, sz, m


@triton.jit
def _gnorm_fwd_kernel(
    y_ptr,
    z_ptr,
    w_ptr,
    out_ptr,
    R,
    G,
    stride_y,
    stride_z,
    stride_o,
    eps,
    YA: tl.constexpr,
    ZA: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    # row strides arrive divided by their power-of-two factor (YA, ZA) so loads vectorise for odd widths
    stride_y = stride_y * YA
    stride_z = stride_z * ZA
    r0 = tl.program_id(0) * BLOCK_R
    col0 = tl.program_id(1) * G
    r = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_G)
    r064 = r0.to(tl.int64)
    yp = y_ptr + r064 * stride_y
    y, z, sz, m = _gate(yp, z_ptr + r064 * stride_z, r0, r, cols, G, R, stride_y, stride_z, col0, ACC)
    g = y * (z * sz)
    rstd = 1.0 / tl.sqrt(tl.reduce(g * g, 1, _SUM) / G + eps)
    w = tl.load(w_ptr + col0 + cols, mask=cols < G, other=0.0).to(ACC)
    out = g * rstd[:, None] * w[None, :]
    op = out_ptr + r064 * stride_o + r[:, None] * stride_o + col0 + cols[None, :]
    tl.store(op, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gnorm_bwd_kernel(
    y_ptr,
    z_ptr,
    w_ptr,
    g_ptr,
    dy_ptr,
    dz_ptr,
    dw_ptr,
    R,
    D,
    G,
    n_iter,
    stride_y,
    stride_z,
    stride_g,
    stride_dy,
    stride_dz,
    eps,
    YA: tl.constexpr,
    ZA: tl.constexpr,
    GA: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    stride_y = stride_y * YA
    stride_z = stride_z * ZA
    stride_g = stride_g * GA
    pid_c = tl.program_id(0)
    col0 = tl.program_id(1) * G
    r = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_G)
    w = tl.load(w_ptr + col0 + cols, mask=cols < G, other=0.0).to(ACC)[None, :]
    dw = tl.full([BLOCK_R, BLOCK_G], 0.0, ACC)
    for it in range(0, n_iter):
        r0 = (pid_c * n_iter + it) * BLOCK_R
        r064 = r0.to(tl.int64)
        y, z, sz, m = _gate(
            y_ptr + r064 * stride_y, z_ptr + r064 * stride_z, r0, r, cols, G, R, stride_y, stride_z, col0, ACC
        )
        go = tl.load(g_ptr + r064 * stride_g + r[:, None] * stride_g + col0 + cols[None, :], mask=m, other=0.0)
        go = go.to(ACC)
        sil = z * sz
        gt = y * sil
        rstd = 1.0 / tl.sqrt(tl.reduce(gt * gt, 1, _SUM) / G + eps)
        n = gt * rstd[:, None]
        dw += go * n
        dn = go * w
        c = tl.reduce(dn * n, 1, _SUM) / G
        dg = (dn - n * c[:, None]) * rstd[:, None]
        dy = dg * sil
        dz = dg * y * sz * (1.0 + z * (1.0 - sz))
        off = r[:, None] * stride_dy + col0 + cols[None, :]
        tl.store(dy_ptr + r064 * stride_dy + off, dy.to(dy_ptr.dtype.element_ty), mask=m)
        off = r[:, None] * stride_dz + col0 + cols[None, :]
        tl.store(dz_ptr + r064 * stride_dz + off, dz.to(dz_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + pid_c * D + col0 + cols, tl.reduce(dw, 0, _SUM), mask=cols < G)


# launched through their compiled kernels after the first call of each signature (m4v.ops.triton_host)
_gnorm_fwd_launch = CachedLaunch(_gnorm_fwd_kernel)
_gnorm_bwd_launch = CachedLaunch(_gnorm_bwd_kernel)


def _acc(dtype: torch.dtype) -> tuple[tl.dtype, torch.dtype]:
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _split(stride: int, elem: int) -> tuple[int, int]:
    """(stride / a, a) with a the largest power of two dividing stride, capped at 16 bytes of elements."""
    a = max(1, 16 // elem)
    while a > 1 and stride % a:
        a //= 2
    return stride // a, a


def _tile(cfg: dict[str, int], group: int) -> tuple[int, int, int]:
    """(rows, padded group, warps) of a tile holding about cfg["elements"] values."""
    bg = next_pow2(group)
    elems = max(bg, cfg["elements"])
    warps = min(16, max(4, elems // cfg["elements_per_warp"]))
    if interpreting():
        warps = 4
    return elems // bg, bg, warps


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    """[R, d] view (a copy only when the leading dims cannot be merged) with unit channel stride."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[0] == 0 else t2.contiguous()


def _forward(y2: torch.Tensor, z2: torch.Tensor, weight: torch.Tensor, group: int, eps: float) -> torch.Tensor:
    R, D = y2.shape
    out = torch.empty(R, D, device=y2.device, dtype=y2.dtype)
    if out.numel() == 0:
        return out
    br, bg, warps = _tile(FWD_CONFIG, group)
    sy, ya = _split(y2.stride(0), y2.element_size())
    sz, za = _split(z2.stride(0), z2.element_size())
    _gnorm_fwd_launch[(cdiv(R, br), D // group)](
        y2, z2, weight, out, R, group, sy, sz, out.stride(0), eps,
        YA=ya, ZA=za, ACC=_acc(y2.dtype)[0], BLOCK_R=br, BLOCK_G=bg, num_warps=warps,
    )  # fmt: skip
    return out


def _backward(
    y2: torch.Tensor, z2: torch.Tensor, weight: torch.Tensor, group: int, eps: float, dout: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    R, D = y2.shape
    acc_tl, acc_torch = _acc(y2.dtype)
    dy = torch.empty(R, D, device=y2.device, dtype=y2.dtype)
    dz = torch.empty(R, D, device=z2.device, dtype=z2.dtype)
    if dy.numel() == 0:
        return dy, dz, torch.zeros(D, device=y2.device, dtype=acc_torch)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    br, bg, warps = _tile(BWD_CONFIG, group)
    n_groups = D // group
    n_blocks = cdiv(R, br)
    target = BWD_CONFIG["programs_per_sm"]  # per multiprocessor; the interpreter counts as one
    if y2.is_cuda:
        target *= torch.cuda.get_device_properties(y2.device).multi_processor_count
    n_chunks = max(1, min(n_blocks, cdiv(target, n_groups)))
    n_iter = cdiv(n_blocks, n_chunks)
    n_chunks = cdiv(n_blocks, n_iter)
    dw_part = torch.empty(n_chunks, D, device=y2.device, dtype=acc_torch)
    sy, ya = _split(y2.stride(0), y2.element_size())
    sz, za = _split(z2.stride(0), z2.element_size())
    sg, ga = _split(dout.stride(0), dout.element_size())
    _gnorm_bwd_launch[(n_chunks, n_groups)](
        y2, z2, weight, dout, dy, dz, dw_part, R, D, group, n_iter,
        sy, sz, sg, dy.stride(0), dz.stride(0), eps,
        YA=ya, ZA=za, GA=ga, ACC=acc_tl, BLOCK_R=br, BLOCK_G=bg, num_warps=warps,
    )  # fmt: skip
    return dy, dz, dw_part.sum(0)


# Forward and backward run as torch.library custom ops under torch.compile: it sees one opaque node per call.
# Eager calls run the same functions through an autograd.Function, without the ops' dispatch (m4v.ops.eager).
@torch.library.custom_op("m4v::gated_rms_norm_triton_fwd", mutates_args=())
def _norm_fwd_op(y2: torch.Tensor, z2: torch.Tensor, weight: torch.Tensor, group: int, eps: float) -> torch.Tensor:
    return _forward(y2, z2, weight, group, eps)


@_norm_fwd_op.register_fake
def _norm_fwd_fake(y2, z2, weight, group, eps):  # type: ignore[no-untyped-def]
    return y2.new_empty(y2.shape)


@torch.library.custom_op("m4v::gated_rms_norm_triton_bwd", mutates_args=())
def _norm_bwd_op(y2: torch.Tensor, z2: torch.Tensor, weight: torch.Tensor, group: int, eps: float,
                 dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dy, dz [R, d] in y's / z's dtype and dweight [d] in the accumulation dtype."""
    return _backward(y2, z2, weight, group, eps, dout)


@_norm_bwd_op.register_fake
def _norm_bwd_fake(y2, z2, weight, group, eps, dout):  # type: ignore[no-untyped-def]
    return y2.new_empty(y2.shape), z2.new_empty(z2.shape), y2.new_empty(y2.shape[1], dtype=_acc(y2.dtype)[1])


def _norm_setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    y2, z2, weight, group, eps = inputs
    ctx.save_for_backward(y2, z2, weight)
    ctx.meta = (group, eps)


def _norm_grad(ctx, dout, backward=_norm_bwd_op):  # type: ignore[no-untyped-def]
    """The backward kernel recomputes the gate and the RMS from the saved inputs (``backward``: the op, or in the
    eager Function the function it wraps)."""
    y2, z2, weight = ctx.saved_tensors
    group, eps = ctx.meta
    dy, dz, dw = backward(y2, z2, weight, group, eps, _rows2d(dout))
    return dy, dz, dw.to(weight.dtype), None, None


torch.library.register_autograd("m4v::gated_rms_norm_triton_fwd", _norm_grad, setup_context=_norm_setup_context)
_norm_eager = eager.eager_function(_forward, _norm_setup_context, functools.partial(_norm_grad, backward=_backward))


def gated_rms_norm(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float = 1e-5
) -> torch.Tensor:
    """Fused ``rmsnorm(y * silu(z)) * weight`` per group of ``group_size`` channels (Triton; CUDA tensors).

    y, z: [..., d] (z may have any row stride); weight: [d]; group_size divides d. Output [..., d] in y's dtype,
    differentiable in y, z and weight. Same result as ``m4v.ops.norm.gated_rms_norm_torch`` up to rounding.
    Runs on CPU tensors only under TRITON_INTERPRET=1.
    """
    if z.shape != y.shape or y.dim() < 1:
        raise ValueError(f"z must have the shape of y {tuple(y.shape)}, got {tuple(z.shape)}.")
    d = y.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight must have shape [{d}], got {tuple(weight.shape)}.")
    if not isinstance(group_size, int) or group_size < 1 or d % group_size:
        raise ValueError(f"group_size must be a positive divisor of the channel count {d}, got {group_size!r}.")
    if y.dtype not in SUPPORTED_DTYPES or z.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"y and z must be bfloat16, float16, float32 or float64, got {y.dtype} and {z.dtype}.")
    if not (y.is_cuda or interpreting()):
        raise ValueError("y must be a CUDA tensor for the Triton norm (or set TRITON_INTERPRET=1 to run on CPU).")
    args = (_rows2d(y), _rows2d(z), weight.contiguous(), group_size, float(eps))
    return eager.call(_norm_fwd_op, _norm_eager, *args).view(y.shape)


__all__ = ["BWD_CONFIG", "FWD_CONFIG", "SUPPORTED_DTYPES", "gated_rms_norm"]
