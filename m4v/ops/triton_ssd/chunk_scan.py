"""Chunk output of the SSD scan (paper Sec. 3.3) with the D skip and the z gate fused.

For a block of rows i of chunk c (state H entering the chunk, [p, n]):
    y_i = exp(acum_i) H C_i + sum_{j <= i in chunk} (C_i . B_j) exp(acum_i - acum_j) dt_j x_j + D x_i,
    out_i = y_i * silu(z_i).
The pre-gate y is also stored when z is given (the backward needs it).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_scan_fwd_kernel(
    x_ptr, z_ptr, b_ptr, c_ptr, dtp_ptr, acum_ptr, st_ptr, d_ptr, out_ptr, ypre_ptr,
    L, H, HPG, P, N, LP,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_z_b, s_z_l, s_z_h, s_z_p,
    s_b_b, s_b_l, s_b_g, s_b_n,
    s_c_b, s_c_l, s_c_g, s_c_n,
    s_st_b, s_st_c, s_st_h,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
    Q: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Grid (Q // BM, nc, b * h); out / ypre are contiguous [b, l, h, p]."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    grp = h // HPG
    b64 = b.to(tl.int64)
    offs_p = tl.arange(0, BP)
    offs_k = tl.arange(0, BK)
    pm = offs_p < P
    km = offs_k < N
    i_loc = pid_m * BM + tl.arange(0, BM)
    t_i = pid_c * Q + i_loc
    im = t_i < L
    row = pid_bh.to(tl.int64) * LP + pid_c * Q
    a_i = tl.load(acum_ptr + row + i_loc)
    c_base = c_ptr + b64 * s_c_b + grp * s_c_g
    b_base = b_ptr + b64 * s_b_b + grp * s_b_g
    x_base = x_ptr + b64 * s_x_b + h * s_x_h
    c_i = tl.load(c_base + t_i[:, None] * s_c_l + offs_k[None, :] * s_c_n, mask=im[:, None] & km[None, :],
                  other=0.0)  # fmt: skip
    # inter-chunk term: C_i H^T, H read as [n, p]
    st_base = st_ptr + b64 * s_st_b + pid_c.to(tl.int64) * s_st_c + h * s_st_h
    h_t = tl.load(st_base + offs_p[None, :] * N + offs_k[:, None], mask=km[:, None] & pm[None, :], other=0.0)
    acc = tl.dot(c_i, h_t.to(c_i.dtype), input_precision=PREC) * tl.exp(a_i)[:, None]
    # intra-chunk term over key blocks j <= i
    hi = (pid_m + 1) * BM
    for j0 in range(0, hi, BN):
        j_loc = j0 + tl.arange(0, BN)
        t_j = pid_c * Q + j_loc
        jm = t_j < L
        b_t = tl.load(b_base + t_j[None, :] * s_b_l + offs_k[:, None] * s_b_n, mask=km[:, None] & jm[None, :],
                      other=0.0)  # fmt: skip
        x_j = tl.load(x_base + t_j[:, None] * s_x_l + offs_p[None, :] * s_x_p, mask=jm[:, None] & pm[None, :],
                      other=0.0)  # fmt: skip
        a_j = tl.load(acum_ptr + row + j_loc)
        dt_j = tl.load(dtp_ptr + row + j_loc)
        s = tl.dot(c_i, b_t, input_precision=PREC)
        causal = i_loc[:, None] >= j_loc[None, :]
        decay = tl.exp(tl.where(causal, a_i[:, None] - a_j[None, :], float("-inf")))
        s = s * decay * dt_j[None, :]
        acc += tl.dot(s.to(x_j.dtype), x_j, input_precision=PREC)
    xm = im[:, None] & pm[None, :]
    if HAS_D:
        x_i = tl.load(x_base + t_i[:, None] * s_x_l + offs_p[None, :] * s_x_p, mask=xm, other=0.0)
        if D_PER_P:
            dv = tl.load(d_ptr + h * P + offs_p, mask=pm, other=0.0).to(tl.float32)
            acc += x_i.to(tl.float32) * dv[None, :]
        else:
            acc += x_i.to(tl.float32) * tl.load(d_ptr + h).to(tl.float32)
    o_off = (b64 * L + t_i[:, None]) * (H * P) + h * P + offs_p[None, :]
    if HAS_Z:
        tl.store(ypre_ptr + o_off, acc.to(ypre_ptr.dtype.element_ty), mask=xm)
        zv = tl.load(z_ptr + b64 * s_z_b + t_i[:, None] * s_z_l + h * s_z_h + offs_p[None, :] * s_z_p, mask=xm,
                     other=0.0).to(tl.float32)  # fmt: skip
        acc = acc * zv / (1.0 + tl.exp(-zv))
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=xm)
