"""Backward of the SSD chunk output (paper Sec. 3.3): gradients of x, dt, B, C, D and of the log decays.

With M_ij = (C_i . B_j) exp(acum_i - acum_j) dt_j (j <= i), dY the gradient of the pre-gate output, H the
state entering the chunk and G the gradient of the state leaving it:
  column side (per key j): dxs_j = sum_i (C_i . B_j) exp(acum_i - acum_j) dY_i + exp(acum_last - acum_j) G B_j;
    dx_j = dt_j dxs_j + D dY_j, ddt_j = x_j . dxs_j,
    dB_j = dt_j [sum_i (dY_i . x_j) exp(acum_i - acum_j) C_i + exp(acum_last - acum_j) G^T x_j];
  row side (per query i): dC_i = sum_j (dY_i . x_j) exp(acum_i - acum_j) dt_j B_j + exp(acum_i) H^T dY_i.
Log-decay gradients, kept apart so that nothing large cancels (see dt_kernels.py): for every pair the
fp32 product pair_ij = (dY_i . x_j) (C_i . B_j) exp(acum_i - acum_j) dt_j, summed per row (rs) and per
column (cs) from the same tile; the state term's part_j = dt_j x_j . exp(acum_last - acum_j) G B_j; the
carried-in term's q_i = exp(acum_i) C_i . H^T dY_i.
B and C are shared by the heads of a group: a program runs HPS heads of one group and writes a partial
sum for its head split; the splits are summed outside.
"""

from __future__ import annotations

import triton
import triton.language as tl

from m4v.ops.triton_ssd.reductions import SUM


@triton.jit
def gate_bwd_kernel(dout_ptr, z_ptr, ypre_ptr, dy_ptr, dz_ptr, numel, BLOCK: tl.constexpr):
    """Elementwise on contiguous tensors: dy = dout * silu(z), dz = dout * y * silu'(z)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    g = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
    zv = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = tl.load(ypre_ptr + offs, mask=m, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-zv))
    tl.store(dy_ptr + offs, (g * zv * sig).to(dy_ptr.dtype.element_ty), mask=m)
    tl.store(dz_ptr + offs, (g * y * sig * (1.0 + zv * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=m)


@triton.jit
def bwd_cols_kernel(
    x_ptr, b_ptr, c_ptr, dy_ptr, dtp_ptr, acum_ptr, dst_ptr, d_ptr,
    dx_ptr, ddt_ptr, db_ptr, dd_ptr, cs_ptr, rs_ptr, part_ptr,
    L, H, HPG, P, N, LP, NS,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_b_b, s_b_l, s_b_g, s_b_n,
    s_c_b, s_c_l, s_c_g, s_c_n,
    s_y_b, s_y_l, s_y_h, s_y_p,
    s_d_b, s_d_c, s_d_h,
    s_db_s, s_db_b, s_db_l,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HPS: tl.constexpr,
    Q: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Grid (Q // BN, nc, b * g * NS). dx [b, l, h, p]; ddt, cs, part [b, h, LP] fp32; db [NS, b, l, g, n] fp32;
    dd [b, nc * Q // BN, h, p] fp32 (partial sums of dY * x); rs [b * h * nc, Q // BN, Q] fp32."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_z = tl.program_id(2)
    G = H // HPG
    b = pid_z // (G * NS)
    grp = (pid_z % (G * NS)) // NS
    split = pid_z % NS
    b64 = b.to(tl.int64)
    offs_p = tl.arange(0, BP)
    offs_k = tl.arange(0, BK)
    pm = offs_p < P
    km = offs_k < N
    j_loc = pid_n * BN + tl.arange(0, BN)
    t_j = pid_c * Q + j_loc
    jm = t_j < L
    xm = jm[:, None] & pm[None, :]
    b_base = b_ptr + b64 * s_b_b + grp * s_b_g
    c_base = c_ptr + b64 * s_c_b + grp * s_c_g
    b_j = tl.load(b_base + t_j[:, None] * s_b_l + offs_k[None, :] * s_b_n, mask=jm[:, None] & km[None, :],
                  other=0.0)  # fmt: skip
    db_acc = tl.full((BN, BK), 0.0, tl.float32)
    i_start = (pid_n * BN // BM) * BM
    NJB = tl.num_programs(0)
    for hh in range(0, HPS):
        h = grp * HPG + split * HPS + hh
        row = (b64 * H + h) * LP + pid_c * Q
        x_base = x_ptr + b64 * s_x_b + h * s_x_h
        y_base = dy_ptr + b64 * s_y_b + h * s_y_h
        x_j = tl.load(x_base + t_j[:, None] * s_x_l + offs_p[None, :] * s_x_p, mask=xm, other=0.0)
        a_j = tl.load(acum_ptr + row + j_loc)
        dt_j = tl.load(dtp_ptr + row + j_loc)
        a_last = tl.load(acum_ptr + row + Q - 1)
        # state term: G is the gradient of the state leaving the chunk, read as [n, p]
        g_base = dst_ptr + b64 * s_d_b + pid_c.to(tl.int64) * s_d_c + h * s_d_h
        g_t = tl.load(g_base + offs_p[None, :] * N + offs_k[:, None], mask=km[:, None] & pm[None, :], other=0.0)
        g_t = g_t.to(x_j.dtype)
        to_end = tl.exp(a_last - a_j)
        dxs = tl.dot(b_j, g_t, input_precision=PREC) * to_end[:, None]
        db_acc += tl.dot(x_j, tl.trans(g_t), input_precision=PREC) * (to_end * dt_j)[:, None]
        # log-decay gradient of the state term, per key j (enters every later step of the chunk)
        tl.store(part_ptr + row + j_loc, tl.reduce(dxs * x_j.to(tl.float32), 1, SUM) * dt_j)
        rs_row = rs_ptr + row * NJB + pid_n * Q
        for i0 in range(0, i_start, BM):  # rows before this key block get no pair from it
            tl.store(rs_row + i0 + tl.arange(0, BM), tl.full((BM,), 0.0, tl.float32))
        colsum = tl.full((BN,), 0.0, tl.float32)
        for i0 in range(i_start, Q, BM):
            i_loc = i0 + tl.arange(0, BM)
            t_i = pid_c * Q + i_loc
            im = t_i < L
            c_i = tl.load(c_base + t_i[:, None] * s_c_l + offs_k[None, :] * s_c_n,
                          mask=im[:, None] & km[None, :], other=0.0)  # fmt: skip
            dy_i = tl.load(y_base + t_i[:, None] * s_y_l + offs_p[None, :] * s_y_p,
                           mask=im[:, None] & pm[None, :], other=0.0)  # fmt: skip
            a_i = tl.load(acum_ptr + row + i_loc)
            causal = i_loc[None, :] >= j_loc[:, None]
            decay = tl.exp(tl.where(causal, a_i[None, :] - a_j[:, None], float("-inf")))  # [BN, BM]
            cb = tl.dot(b_j, tl.trans(c_i), input_precision=PREC)
            dxs += tl.dot((cb * decay).to(dy_i.dtype), dy_i, input_precision=PREC)
            dm = tl.dot(x_j, tl.trans(dy_i), input_precision=PREC) * decay * dt_j[:, None]
            db_acc += tl.dot(dm.to(c_i.dtype), c_i, input_precision=PREC)
            # gradient of the log decay between j and i for each pair, summed per row and per column
            pair = dm * cb
            colsum += tl.reduce(pair, 1, SUM)
            tl.store(rs_row + i_loc, tl.reduce(pair, 0, SUM))
        tl.store(cs_ptr + row + j_loc, colsum)
        dx = dxs * dt_j[:, None]
        tl.store(ddt_ptr + row + j_loc, tl.reduce(dxs * x_j.to(tl.float32), 1, SUM))
        if HAS_D:
            dy_j = tl.load(y_base + t_j[:, None] * s_y_l + offs_p[None, :] * s_y_p, mask=xm, other=0.0)
            dy_j = dy_j.to(tl.float32)
            if D_PER_P:
                dv = tl.load(d_ptr + h * P + offs_p, mask=pm, other=0.0).to(tl.float32)
                dx += dy_j * dv[None, :]
            else:
                dx += dy_j * tl.load(d_ptr + h).to(tl.float32)
            dd_off = ((b64 * tl.num_programs(1) + pid_c) * tl.num_programs(0) + pid_n) * (H * P) + h * P
            tl.store(dd_ptr + dd_off + offs_p, tl.reduce(dy_j * x_j.to(tl.float32), 0, SUM), mask=pm)
        tl.store(dx_ptr + (b64 * L + t_j[:, None]) * (H * P) + h * P + offs_p[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=xm)  # fmt: skip
    db_off = split.to(tl.int64) * s_db_s + b64 * s_db_b + t_j[:, None] * s_db_l + grp * N + offs_k[None, :]
    tl.store(db_ptr + db_off, db_acc, mask=jm[:, None] & km[None, :])


@triton.jit
def bwd_rows_kernel(
    x_ptr, b_ptr, c_ptr, dy_ptr, dtp_ptr, acum_ptr, st_ptr,
    dc_ptr, q_ptr,
    L, H, HPG, P, N, LP, NS,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_b_b, s_b_l, s_b_g, s_b_n,
    s_c_b, s_c_l, s_c_g, s_c_n,
    s_y_b, s_y_l, s_y_h, s_y_p,
    s_st_b, s_st_c, s_st_h,
    s_dc_s, s_dc_b, s_dc_l,
    HPS: tl.constexpr,
    Q: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Grid (Q // BM, nc, b * g * NS). dc [NS, b, l, g, n] fp32; q [b, h, LP] fp32."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_z = tl.program_id(2)
    G = H // HPG
    b = pid_z // (G * NS)
    grp = (pid_z % (G * NS)) // NS
    split = pid_z % NS
    b64 = b.to(tl.int64)
    offs_p = tl.arange(0, BP)
    offs_k = tl.arange(0, BK)
    pm = offs_p < P
    km = offs_k < N
    i_loc = pid_m * BM + tl.arange(0, BM)
    t_i = pid_c * Q + i_loc
    im = t_i < L
    b_base = b_ptr + b64 * s_b_b + grp * s_b_g
    c_base = c_ptr + b64 * s_c_b + grp * s_c_g
    c_i = tl.load(c_base + t_i[:, None] * s_c_l + offs_k[None, :] * s_c_n, mask=im[:, None] & km[None, :],
                  other=0.0)  # fmt: skip
    dc_acc = tl.full((BM, BK), 0.0, tl.float32)
    hi = (pid_m + 1) * BM
    for hh in range(0, HPS):
        h = grp * HPG + split * HPS + hh
        row = (b64 * H + h) * LP + pid_c * Q
        x_base = x_ptr + b64 * s_x_b + h * s_x_h
        dy_i = tl.load(dy_ptr + b64 * s_y_b + h * s_y_h + t_i[:, None] * s_y_l + offs_p[None, :] * s_y_p,
                       mask=im[:, None] & pm[None, :], other=0.0)  # fmt: skip
        a_i = tl.load(acum_ptr + row + i_loc)
        # inter-chunk term: exp(acum_i) dY_i H, H the state entering the chunk, [p, n]
        st_base = st_ptr + b64 * s_st_b + pid_c.to(tl.int64) * s_st_c + h * s_st_h
        h_in = tl.load(st_base + offs_p[:, None] * N + offs_k[None, :], mask=pm[:, None] & km[None, :], other=0.0)
        dc_in = tl.dot(dy_i, h_in.to(dy_i.dtype), input_precision=PREC) * tl.exp(a_i)[:, None]
        tl.store(q_ptr + row + i_loc, tl.reduce(dc_in * c_i.to(tl.float32), 1, SUM))
        dc_acc += dc_in
        for j0 in range(0, hi, BN):
            j_loc = j0 + tl.arange(0, BN)
            t_j = pid_c * Q + j_loc
            jm = t_j < L
            x_j = tl.load(x_base + t_j[:, None] * s_x_l + offs_p[None, :] * s_x_p, mask=jm[:, None] & pm[None, :],
                          other=0.0)  # fmt: skip
            b_j = tl.load(b_base + t_j[:, None] * s_b_l + offs_k[None, :] * s_b_n,
                          mask=jm[:, None] & km[None, :], other=0.0)  # fmt: skip
            a_j = tl.load(acum_ptr + row + j_loc)
            dt_j = tl.load(dtp_ptr + row + j_loc)
            causal = i_loc[:, None] >= j_loc[None, :]
            w = tl.exp(tl.where(causal, a_i[:, None] - a_j[None, :], float("-inf"))) * dt_j[None, :]
            dm = tl.dot(dy_i, tl.trans(x_j), input_precision=PREC)
            dc_acc += tl.dot((dm * w).to(b_j.dtype), b_j, input_precision=PREC)
    dc_off = split.to(tl.int64) * s_dc_s + b64 * s_dc_b + t_i[:, None] * s_dc_l + grp * N + offs_k[None, :]
    tl.store(dc_ptr + dc_off, dc_acc, mask=im[:, None] & km[None, :])
