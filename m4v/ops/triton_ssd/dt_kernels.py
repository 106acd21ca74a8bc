"""Step sizes and in-chunk log-decay prefix sums of the SSD scan, forward and backward (paper Sec. 3.3).

Forward, per (batch, head, chunk): dt = softplus(dt_raw + dt_bias) (bias and softplus optional) and
acum_i = sum_{k <= i} dt_k * A inside the chunk. Both are stored fp32 in a [b, h, nc * Q] layout padded
with dt = 0 past the sequence end, so acum is flat there and acum[Q - 1] is the chunk's total decay.

Backward: the gradient of a_k = dt_k A collects every term whose decay spans step k:
  pairs (i >= k > j) inside the chunk: suffix sum over i >= k of (row sums - column sums) of pair_ij;
  the carried-in state read at steps i >= k: suffix sum of q_i;
  the chunk's own state, built from steps j < k: prefix sum of part_j;
  the state entering the chunk, decayed through it: E_c = <G_c, exp(acum_last) H_{c-1}>.
Row and column sums come from the same fp32 pair values, so the diagonal cancels exactly (forming the
difference from separately rounded bf16 products instead loses most of the digits). The result is
folded into ddt (then through softplus into the raw dt) and into dA.
"""

from __future__ import annotations

import triton
import triton.language as tl

from m4v.ops.triton_ssd.reductions import SUM


@triton.jit
def dt_fwd_kernel(
    dt_ptr, bias_ptr, a_ptr, dtp_ptr, acum_ptr,
    L, H, LP,
    s_dt_b, s_dt_l, s_dt_h,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, Q: tl.constexpr,
):  # fmt: skip
    """Grid (nc, b * h): processed dt and in-chunk cumsum of dt * A for one chunk."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs = tl.arange(0, Q)
    t = pid_c * Q + offs
    mask = t < L
    raw = tl.load(dt_ptr + b.to(tl.int64) * s_dt_b + t * s_dt_l + h * s_dt_h, mask=mask, other=0.0)
    v = raw.to(tl.float32)
    if HAS_BIAS:
        v = v + tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        v = tl.where(v <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))), v)
    v = tl.where(mask, v, 0.0)
    a = tl.load(a_ptr + h).to(tl.float32)
    acum = tl.associative_scan(v * a, 0, SUM)
    base = pid_bh.to(tl.int64) * LP + pid_c * Q
    tl.store(dtp_ptr + base + offs, v)
    tl.store(acum_ptr + base + offs, acum)


@triton.jit
def dt_bwd_kernel(
    dt_ptr, bias_ptr, a_ptr, dtp_ptr, ddt_ptr, rs_ptr, cs_ptr, q_ptr, part_ptr, e_ptr, ddt_raw_ptr, da_part_ptr,
    L, H, LP, NC, NJB,
    s_dt_b, s_dt_l, s_dt_h,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, Q: tl.constexpr,
):  # fmt: skip
    """Grid (nc, b * h): d(dt_raw) [b, l, h] and a partial dA [b, h, nc]. rs: [b * h * nc, NJB, Q] row sums."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs = tl.arange(0, Q)
    t = pid_c * Q + offs
    mask = t < L
    base = pid_bh.to(tl.int64) * LP + pid_c * Q
    dtp = tl.load(dtp_ptr + base + offs)
    ddt = tl.load(ddt_ptr + base + offs)
    rows = tl.full((Q,), 0.0, tl.float32)
    for s in range(0, NJB):
        rows += tl.load(rs_ptr + base * NJB + s * Q + offs)
    suffix = rows - tl.load(cs_ptr + base + offs) + tl.load(q_ptr + base + offs)
    part = tl.load(part_ptr + base + offs)
    e = tl.load(e_ptr + pid_bh.to(tl.int64) * NC + pid_c)
    # suffix sum (as total - prefix + own term) and exclusive prefix sum
    da = tl.reduce(suffix, 0, SUM) - tl.associative_scan(suffix, 0, SUM) + suffix
    da += e + tl.associative_scan(part, 0, SUM) - part
    a = tl.load(a_ptr + h).to(tl.float32)
    g = ddt + da * a
    tl.store(da_part_ptr + pid_bh.to(tl.int64) * NC + pid_c, tl.reduce(da * dtp, 0, SUM))
    if SOFTPLUS:
        raw = tl.load(dt_ptr + b.to(tl.int64) * s_dt_b + t * s_dt_l + h * s_dt_h, mask=mask, other=0.0)
        v = raw.to(tl.float32)
        if HAS_BIAS:
            v = v + tl.load(bias_ptr + h).to(tl.float32)
        g = g / (1.0 + tl.exp(-v))
    tl.store(ddt_raw_ptr + (b.to(tl.int64) * L + t) * H + h, g, mask=mask)
