"""Per-chunk state reductions of the SSD scan (paper Sec. 3.3): S_c = sum_j w_j u_j v_j^T, a [p, n] matmul.

MODE 0 (forward): u = x, v = B, w_j = exp(acum_last - acum_j) * dt_j: the state a chunk builds from its
own inputs, decayed to the chunk end.
MODE 1 (backward): u = dY, v = C, w_i = exp(acum_i): the gradient that the chunk's outputs send to the
state entering it.
u is per head, v per group (head h reads group h // (h / g)); the result is fp32 [b, slot c, h, p, n].
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_state_kernel(
    u_ptr, v_ptr, dtp_ptr, acum_ptr, out_ptr,
    L, H, HPG, P, N, LP,
    s_u_b, s_u_l, s_u_h, s_u_p,
    s_v_b, s_v_l, s_v_g, s_v_n,
    s_o_b, s_o_c, s_o_h,
    MODE: tl.constexpr, Q: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Grid (nc, b * h, cdiv(p, BP) * cdiv(n, BN))."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_pn = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    grp = h // HPG
    n_blocks = (N + BN - 1) // BN
    offs_p = (pid_pn // n_blocks) * BP + tl.arange(0, BP)
    offs_n = (pid_pn % n_blocks) * BN + tl.arange(0, BN)
    pm = offs_p < P
    nm = offs_n < N
    u_base = u_ptr + b.to(tl.int64) * s_u_b + h * s_u_h
    v_base = v_ptr + b.to(tl.int64) * s_v_b + grp * s_v_g
    row = pid_bh.to(tl.int64) * LP + pid_c * Q
    a_last = tl.load(acum_ptr + row + Q - 1)
    acc = tl.full((BP, BN), 0.0, tl.float32)
    for k0 in range(0, Q, BK):
        offs_k = k0 + tl.arange(0, BK)
        t = pid_c * Q + offs_k
        tm = t < L
        ut = tl.load(u_base + t[None, :] * s_u_l + offs_p[:, None] * s_u_p, mask=pm[:, None] & tm[None, :],
                     other=0.0)  # fmt: skip
        v = tl.load(v_base + t[:, None] * s_v_l + offs_n[None, :] * s_v_n, mask=tm[:, None] & nm[None, :],
                    other=0.0)  # fmt: skip
        a = tl.load(acum_ptr + row + offs_k)
        if MODE == 0:
            w = tl.exp(a_last - a) * tl.load(dtp_ptr + row + offs_k)
        else:
            w = tl.exp(a)
        vw = (v.to(tl.float32) * w[:, None]).to(ut.dtype)
        acc += tl.dot(ut, vw, input_precision=PREC)
    o_base = out_ptr + b.to(tl.int64) * s_o_b + pid_c.to(tl.int64) * s_o_c + h * s_o_h
    tl.store(o_base + offs_p[:, None] * N + offs_n[None, :], acc, mask=pm[:, None] & nm[None, :])
