"""Fused Triton kernels of the Mamba2 short causal depthwise conv (M4V Sec. 3.1): conv + bias + SiLU + sequence mask.

They read the ``[b, l, d]`` layout in place (rows may be strided, e.g. a slice of the in_proj output; channels must
be contiguous): no transposes, no padding copies. A program walks BLOCK_S independent row ranges ("streams") side
by side over BLOCK_D contiguous channels, 4 rows per step, keeping the last 3 input rows (and, backward, the last
4 pre-activation gradients) in registers, so every value is loaded and every SiLU evaluated once; only 3 halo rows
per stream are re-read. All math is in float32 (float64 for float64 inputs). The kernels are written for 4 taps;
shorter kernels are zero-padded on the oldest side. The backward recomputes the pre-activation from ``x``
(nothing but the inputs is saved) and writes per-program partial weight / bias gradients that torch then sums
(deterministic, no atomics). See docs/kernels_layer.md.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from m4v.ops import eager
from m4v.ops.triton_host import CachedLaunch, cdiv, interpreting, next_pow2

TAPS = 4  # kernel width the Triton kernels are written for (Mamba2's d_conv)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# Launch parameters: a program runs BLOCK_S streams (row ranges) side by side over BLOCK_D channels, 4 rows a step;
# rows per stream (within [min_rows, max_rows]) are sized so that about programs_per_sm programs per multiprocessor
# cover the input. Module-level so that benchmarks can sweep them.
FWD_CONFIG: dict[str, int] = {
    "BLOCK_S": 4, "BLOCK_D": 128, "num_warps": 4, "programs_per_sm": 16, "min_rows": 32, "max_rows": 256,
}  # fmt: skip
BWD_CONFIG: dict[str, int] = {
    "BLOCK_S": 4, "BLOCK_D": 128, "num_warps": 4, "programs_per_sm": 16, "min_rows": 32, "max_rows": 256,
}  # fmt: skip


@triton.jit
def _add(a, b):
    return a + b


# tl.sum is itself a @triton.jit function, which TRITON_INTERPRET=1 cannot call when triton.language was imported
# before the variable was set; tl.reduce with the standard combine function runs compiled and interpreted alike.
_SUM = getattr(getattr(tl, "standard", None), "_sum_combine", _add)


@triton.jit
def _load_row(ptr, m_ptr, t, L, stride_l, offs_d, dmask, ACC: tl.constexpr, HAS_MASK: tl.constexpr):
    """Row t[s] of every stream s as a [BLOCK_S, BLOCK_D] tile in ACC: zero outside [0, L) and at masked rows."""
    ok = (t >= 0) & (t < L)
    ptrs = ptr + t.to(tl.int64)[:, None] * stride_l + offs_d[None, :]
    v = tl.load(ptrs, mask=ok[:, None] & dmask[None, :], other=0.0).to(ACC)
    if HAS_MASK:
        v = v * tl.load(m_ptr + t, mask=ok, other=0.0).to(ACC)[:, None]
    return v


@triton.jit
def _store_row(ptr, m_ptr, t, L, stride_l, offs_d, dmask, v, live, HAS_MASK: tl.constexpr):
    """Store row t[s] of every stream (zeroed at masked rows); ``live`` is a scalar gate."""
    ok = (t < L) & live
    if HAS_MASK:
        v = v * tl.load(m_ptr + t, mask=ok, other=0.0).to(v.dtype)[:, None]
    out = v.to(ptr.dtype.element_ty)
    tl.store(ptr + t.to(tl.int64)[:, None] * stride_l + offs_d[None, :], out, mask=ok[:, None] & dmask[None, :])


@triton.jit
def _tap(w_ptr, j, offs_d, dmask, XDT: tl.constexpr, ACC: tl.constexpr):
    """Tap j of the [d, 4] weight as a [1, BLOCK_D] row, rounded to the input dtype like the torch path."""
    w = tl.load(w_ptr + offs_d * 4 + j, mask=dmask, other=0.0)
    return w.to(XDT).to(ACC)[None, :]


@triton.jit
def _act(pre, SILU: tl.constexpr):
    if SILU:
        pre = pre / (1.0 + tl.exp(-pre))
    return pre


@triton.jit
def _dpre(x3, x2, x1, x0, g, w0, w1, w2, w3, bias, SILU: tl.constexpr):
    """Gradient w.r.t. the pre-activation of the row whose inputs are x3 (oldest) .. x0, given its output grad g."""
    if SILU:
        pre = bias + w0 * x3 + w1 * x2 + w2 * x1 + w3 * x0
        s = 1.0 / (1.0 + tl.exp(-pre))
        g = g * s * (1.0 + pre * (1.0 - s))
    return g


@triton.jit
def _conv_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    mask_ptr,
    out_ptr,
    L,
    D,
    n_quads,
    stride_xb,
    stride_xl,
    stride_mb,
    stride_ob,
    stride_ol,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
    XA: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # x strides arrive divided by XA (their largest power-of-two factor, up to 16 bytes) so that the compiler
    # sees the row alignment and vectorises the loads even for odd widths such as a slice of the in_proj output
    stride_xl = stride_xl * XA
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    t = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)) * (4 * n_quads)  # first row of each stream
    xp = x_ptr + pid_b * stride_xb * XA  # int64 before the scaling
    mp = mask_ptr + pid_b * stride_mb
    op = out_ptr + pid_b * stride_ob
    XDT: tl.constexpr = x_ptr.dtype.element_ty
    w0 = _tap(w_ptr, 0, offs_d, dmask, XDT, ACC)
    w1 = _tap(w_ptr, 1, offs_d, dmask, XDT, ACC)
    w2 = _tap(w_ptr, 2, offs_d, dmask, XDT, ACC)
    w3 = _tap(w_ptr, 3, offs_d, dmask, XDT, ACC)
    bias = tl.full([1, BLOCK_D], 0.0, ACC)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + offs_d, mask=dmask, other=0.0).to(XDT).to(ACC)[None, :]
    # the three rows before each stream (zero before the sequence start), then 4 new rows per step
    x3 = _load_row(xp, mp, t - 3, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
    x2 = _load_row(xp, mp, t - 2, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
    x1 = _load_row(xp, mp, t - 1, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
    for _ in range(0, n_quads):
        xa = _load_row(xp, mp, t, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
        xb = _load_row(xp, mp, t + 1, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
        xc = _load_row(xp, mp, t + 2, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
        xd = _load_row(xp, mp, t + 3, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
        oa = _act(bias + w0 * x3 + w1 * x2 + w2 * x1 + w3 * xa, SILU)
        ob = _act(bias + w0 * x2 + w1 * x1 + w2 * xa + w3 * xb, SILU)
        oc = _act(bias + w0 * x1 + w1 * xa + w2 * xb + w3 * xc, SILU)
        od = _act(bias + w0 * xa + w1 * xb + w2 * xc + w3 * xd, SILU)
        _store_row(op, mp, t, L, stride_ol, offs_d, dmask, oa, True, HAS_MASK)
        _store_row(op, mp, t + 1, L, stride_ol, offs_d, dmask, ob, True, HAS_MASK)
        _store_row(op, mp, t + 2, L, stride_ol, offs_d, dmask, oc, True, HAS_MASK)
        _store_row(op, mp, t + 3, L, stride_ol, offs_d, dmask, od, True, HAS_MASK)
        x3 = xb
        x2 = xc
        x1 = xd
        t += 4


@triton.jit
def _conv_bwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    mask_ptr,
    g_ptr,
    dx_ptr,
    dw_ptr,
    db_ptr,
    L,
    D,
    n_quads,
    stride_xb,
    stride_xl,
    stride_mb,
    stride_gb,
    stride_gl,
    stride_dxb,
    stride_dxl,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
    XA: tl.constexpr,
    GA: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    stride_xl = stride_xl * XA  # see _conv_fwd_kernel
    stride_gl = stride_gl * GA
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    t = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)) * (4 * n_quads)
    xp = x_ptr + pid_b * stride_xb * XA  # int64 before the scaling
    gp = g_ptr + pid_b * stride_gb * GA
    dxp = dx_ptr + pid_b * stride_dxb
    mp = mask_ptr + pid_b * stride_mb
    XDT: tl.constexpr = x_ptr.dtype.element_ty
    w0 = _tap(w_ptr, 0, offs_d, dmask, XDT, ACC)
    w1 = _tap(w_ptr, 1, offs_d, dmask, XDT, ACC)
    w2 = _tap(w_ptr, 2, offs_d, dmask, XDT, ACC)
    w3 = _tap(w_ptr, 3, offs_d, dmask, XDT, ACC)
    bias = tl.full([1, BLOCK_D], 0.0, ACC)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + offs_d, mask=dmask, other=0.0).to(XDT).to(ACC)[None, :]
    zero = tl.full([BLOCK_S, BLOCK_D], 0.0, ACC)
    dw0 = zero
    dw1 = zero
    dw2 = zero
    dw3 = zero
    db = zero
    # e4..e1: pre-activation gradients of the 4 rows before t; x3..x1: the (masked) inputs of the 3 rows before t
    e4 = zero
    e3 = zero
    e2 = zero
    e1 = zero
    x3 = _load_row(xp, mp, t - 3, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
    x2 = _load_row(xp, mp, t - 2, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
    x1 = _load_row(xp, mp, t - 1, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
    for k in range(0, n_quads):
        xa = _load_row(xp, mp, t, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
        xb = _load_row(xp, mp, t + 1, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
        xc = _load_row(xp, mp, t + 2, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
        xd = _load_row(xp, mp, t + 3, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
        ea = _load_row(gp, mp, t, L, stride_gl, offs_d, dmask, ACC, HAS_MASK)
        eb = _load_row(gp, mp, t + 1, L, stride_gl, offs_d, dmask, ACC, HAS_MASK)
        ec = _load_row(gp, mp, t + 2, L, stride_gl, offs_d, dmask, ACC, HAS_MASK)
        ed = _load_row(gp, mp, t + 3, L, stride_gl, offs_d, dmask, ACC, HAS_MASK)
        ea = _dpre(x3, x2, x1, xa, ea, w0, w1, w2, w3, bias, SILU)
        eb = _dpre(x2, x1, xa, xb, eb, w0, w1, w2, w3, bias, SILU)
        ec = _dpre(x1, xa, xb, xc, ec, w0, w1, w2, w3, bias, SILU)
        ed = _dpre(xa, xb, xc, xd, ed, w0, w1, w2, w3, bias, SILU)
        dw0 += ea * x3 + eb * x2 + ec * x1 + ed * xa
        dw1 += ea * x2 + eb * x1 + ec * xa + ed * xb
        dw2 += ea * x1 + eb * xa + ec * xb + ed * xc
        dw3 += ea * xa + eb * xb + ec * xc + ed * xd
        db += ea + eb + ec + ed
        # dx of the 4 rows before t (they need the gradients up to row t + 2); none before the stream's start
        live = k > 0
        _store_row(dxp, mp, t - 4, L, stride_dxl, offs_d, dmask, w3 * e4 + w2 * e3 + w1 * e2 + w0 * e1, live, HAS_MASK)
        _store_row(dxp, mp, t - 3, L, stride_dxl, offs_d, dmask, w3 * e3 + w2 * e2 + w1 * e1 + w0 * ea, live, HAS_MASK)
        _store_row(dxp, mp, t - 2, L, stride_dxl, offs_d, dmask, w3 * e2 + w2 * e1 + w1 * ea + w0 * eb, live, HAS_MASK)
        _store_row(dxp, mp, t - 1, L, stride_dxl, offs_d, dmask, w3 * e1 + w2 * ea + w1 * eb + w0 * ec, live, HAS_MASK)
        x3 = xb
        x2 = xc
        x1 = xd
        e4 = ea
        e3 = eb
        e2 = ec
        e1 = ed
        t += 4
    # tail: the next stream's first 3 rows complete the dx of this stream's last 4 rows
    xa = _load_row(xp, mp, t, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
    xb = _load_row(xp, mp, t + 1, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
    xc = _load_row(xp, mp, t + 2, L, stride_xl, offs_d, dmask, ACC, HAS_MASK)
    ea = _load_row(gp, mp, t, L, stride_gl, offs_d, dmask, ACC, HAS_MASK)
    eb = _load_row(gp, mp, t + 1, L, stride_gl, offs_d, dmask, ACC, HAS_MASK)
    ec = _load_row(gp, mp, t + 2, L, stride_gl, offs_d, dmask, ACC, HAS_MASK)
    ea = _dpre(x3, x2, x1, xa, ea, w0, w1, w2, w3, bias, SILU)
    eb = _dpre(x2, x1, xa, xb, eb, w0, w1, w2, w3, bias, SILU)
    ec = _dpre(x1, xa, xb, xc, ec, w0, w1, w2, w3, bias, SILU)
    _store_row(dxp, mp, t - 4, L, stride_dxl, offs_d, dmask, w3 * e4 + w2 * e3 + w1 * e2 + w0 * e1, True, HAS_MASK)
    _store_row(dxp, mp, t - 3, L, stride_dxl, offs_d, dmask, w3 * e3 + w2 * e2 + w1 * e1 + w0 * ea, True, HAS_MASK)
    _store_row(dxp, mp, t - 2, L, stride_dxl, offs_d, dmask, w3 * e2 + w2 * e1 + w1 * ea + w0 * eb, True, HAS_MASK)
    _store_row(dxp, mp, t - 1, L, stride_dxl, offs_d, dmask, w3 * e1 + w2 * ea + w1 * eb + w0 * ec, True, HAS_MASK)
    part = pid_b * tl.num_programs(1) + pid_s
    wp = dw_ptr + part * (4 * D) + offs_d
    tl.store(wp, tl.reduce(dw0, 0, _SUM), mask=dmask)
    tl.store(wp + D, tl.reduce(dw1, 0, _SUM), mask=dmask)
    tl.store(wp + 2 * D, tl.reduce(dw2, 0, _SUM), mask=dmask)
    tl.store(wp + 3 * D, tl.reduce(dw3, 0, _SUM), mask=dmask)
    tl.store(db_ptr + part * D + offs_d, tl.reduce(db, 0, _SUM), mask=dmask)


# launched through their compiled kernels after the first call of each signature (m4v.ops.triton_host)
_conv_fwd_launch = CachedLaunch(_conv_fwd_kernel)
_conv_bwd_launch = CachedLaunch(_conv_bwd_kernel)


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _layout(cfg: dict[str, int], b: int, L: int, D: int, device: torch.device) -> tuple[int, int, int, int]:
    """(streams per program, channels per program, row quads per stream, stream groups) for a [b, L, D] input.

    Rows per stream (a multiple of 4) are chosen so that about programs_per_sm programs per multiprocessor
    cover the input, within [min_rows, max_rows]; every stream re-reads 3 rows of each neighbour's (L2 hits).
    """
    bd = min(cfg["BLOCK_D"], max(16, next_pow2(D)))
    bs = cfg["BLOCK_S"]
    n_d = cdiv(D, bd)
    target = cfg["programs_per_sm"]  # per multiprocessor; the interpreter counts as one
    if device.type == "cuda":
        target *= torch.cuda.get_device_properties(device).multi_processor_count
    groups = max(1, cdiv(target, n_d * b))
    rows = min(cfg["max_rows"], max(cfg["min_rows"], 4, cdiv(L, groups * bs)), 4 * cdiv(L, 4))
    quads = cdiv(rows, 4)
    bs = min(bs, max(1, next_pow2(cdiv(L, 4 * quads))))
    return bs, bd, quads, cdiv(L, 4 * quads * bs)


def _aligned_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch stride, row stride) of a [b, l, d] tensor divided by their common power-of-two factor a, and a.

    a is capped at 16 bytes' worth of elements: the widest vector load.
    """
    a = max(1, 16 // t.element_size())
    while a > 1 and (t.stride(0) % a or t.stride(1) % a):
        a //= 2
    return t.stride(0) // a, t.stride(1) // a, a


def _mask_arg(seq_mask: torch.Tensor | None, ref: torch.Tensor) -> tuple[torch.Tensor, int]:
    if seq_mask is None:
        return ref, 0  # never read
    m = seq_mask.to(device=ref.device, dtype=torch.float32).contiguous()
    return m, m.stride(0)


def _conv_forward(
    x: torch.Tensor, w4: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    b, L, D = x.shape
    out = torch.empty(b, L, D, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    bs, bd, quads, groups = _layout(FWD_CONFIG, b, L, D, x.device)
    m, smb = _mask_arg(mask, x)
    sxb, sxl, xa = _aligned_strides(x)
    _conv_fwd_launch[(cdiv(D, bd), groups, b)](
        x, w4, x if bias is None else bias, m, out, L, D, quads,
        sxb, sxl, smb, out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, SILU=silu, ACC=_acc_dtype(x.dtype), XA=xa,
        BLOCK_S=bs, BLOCK_D=bd, num_warps=FWD_CONFIG["num_warps"],
    )  # fmt: skip
    return out


def _conv_backward(
    x: torch.Tensor,
    w4: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    silu: bool,
    dout: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx [b, l, d] in x's dtype; dw [d, 4] and db [d] in the accumulation dtype."""
    b, L, D = x.shape
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = torch.empty(b, L, D, device=x.device, dtype=x.dtype)
    if dx.numel() == 0:
        dw = torch.zeros(D, TAPS, device=x.device, dtype=acc_dtype)
        return dx, dw, torch.zeros(D, device=x.device, dtype=acc_dtype)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    bs, bd, quads, groups = _layout(BWD_CONFIG, b, L, D, x.device)
    dw_part = torch.empty(b * groups, TAPS, D, device=x.device, dtype=acc_dtype)
    db_part = torch.empty(b * groups, D, device=x.device, dtype=acc_dtype)
    m, smb = _mask_arg(mask, x)
    sxb, sxl, xa = _aligned_strides(x)
    sgb, sgl, ga = _aligned_strides(dout)
    _conv_bwd_launch[(cdiv(D, bd), groups, b)](
        x, w4, x if bias is None else bias, m, dout, dx, dw_part, db_part, L, D, quads,
        sxb, sxl, smb, sgb, sgl, dx.stride(0), dx.stride(1),
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, SILU=silu, ACC=_acc_dtype(x.dtype), XA=xa, GA=ga,
        BLOCK_S=bs, BLOCK_D=bd, num_warps=BWD_CONFIG["num_warps"],
    )  # fmt: skip
    return dx, dw_part.sum(0).t(), db_part.sum(0)


# Forward and backward run as torch.library custom ops under torch.compile: it sees one opaque node per call (no
# tracing into the Triton launch), with the output shapes given by the fake implementations below. Eager calls run
# the same functions through an autograd.Function, without the ops' dispatch (m4v.ops.eager).
@torch.library.custom_op("m4v::causal_conv1d_triton_fwd", mutates_args=())
def _conv_fwd_op(x: torch.Tensor, w4: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None,
                 silu: bool) -> torch.Tensor:  # fmt: skip
    return _conv_forward(x, w4, bias, mask, silu)


@_conv_fwd_op.register_fake
def _conv_fwd_fake(x, w4, bias, mask, silu):  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape)


@torch.library.custom_op("m4v::causal_conv1d_triton_bwd", mutates_args=())
def _conv_bwd_op(x: torch.Tensor, w4: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None, silu: bool,
                 dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dx [b, l, d] (x's dtype), dw [d, 4] and db [d] (accumulation dtype)."""
    dx, dw, db = _conv_backward(x, w4, bias, mask, silu, dout)
    return dx, dw.contiguous(), db


@_conv_bwd_op.register_fake
def _conv_bwd_fake(x, w4, bias, mask, silu, dout):  # type: ignore[no-untyped-def]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), x.new_empty(x.shape[2], TAPS, dtype=acc), x.new_empty(x.shape[2], dtype=acc)


def _conv_setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, w4, bias, mask, silu = inputs
    ctx.save_for_backward(x, w4, bias, mask)
    ctx.silu = silu


def _conv_grad(ctx, dout, backward=_conv_bwd_op):  # type: ignore[no-untyped-def]
    """The backward kernel recomputes the pre-activation from the saved inputs (``backward``: the op, or in the
    eager Function the function it wraps)."""
    x, w4, bias, mask = ctx.saved_tensors
    dx, dw, db = backward(x, w4, bias, mask, ctx.silu, dout)
    return dx, dw.to(w4.dtype), None if bias is None else db.to(bias.dtype), None, None


torch.library.register_autograd("m4v::causal_conv1d_triton_fwd", _conv_grad, setup_context=_conv_setup_context)
_conv_eager = eager.eager_function(
    _conv_forward, _conv_setup_context, functools.partial(_conv_grad, backward=_conv_backward)
)


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    seq_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of ``m4v.ops.conv.causal_conv1d`` (same arguments and result; differentiable in x, weight, bias).

    x: [b, l, d] with contiguous channels (any row / batch strides); weight [d, k] with k <= 4; bias [d] or None;
    activation None or "silu" ("swish"); seq_mask [b, l] (bool or 0/1, not differentiated) or None.
    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape [batch, length, channels], got {tuple(x.shape)}.")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be bfloat16, float16, float32 or float64 for the Triton conv, got {x.dtype}.")
    d = x.shape[2]
    if weight.dim() != 2 or weight.shape[0] != d or not 1 <= weight.shape[1] <= TAPS:
        raise ValueError(f"weight must have shape [{d}, k] with 1 <= k <= {TAPS}, got {tuple(weight.shape)}.")
    if bias is not None and bias.shape != (d,):
        raise ValueError(f"bias must have shape [{d}], got {tuple(bias.shape)}.")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}.")
    if seq_mask is not None and seq_mask.shape != x.shape[:2]:
        raise ValueError(f"seq_mask must have shape [{x.shape[0]}, {x.shape[1]}], got {tuple(seq_mask.shape)}.")
    if not (x.is_cuda or interpreting()):
        raise ValueError("x must be a CUDA tensor for the Triton conv (or set TRITON_INTERPRET=1 to run on CPU).")
    if x.stride(-1) != 1:
        x = x.contiguous()
    mask = None if seq_mask is None else seq_mask.detach()
    k = weight.shape[1]
    w4 = (weight if k == TAPS else F.pad(weight, (TAPS - k, 0))).contiguous()  # taps right-aligned
    args = (x, w4, None if bias is None else bias.contiguous(), mask, activation is not None)
    return eager.call(_conv_fwd_op, _conv_eager, *args)


__all__ = ["BWD_CONFIG", "FWD_CONFIG", "SUPPORTED_DTYPES", "causal_conv1d_triton"]
