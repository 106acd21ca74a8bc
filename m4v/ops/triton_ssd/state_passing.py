"""Recurrence over chunks of the SSD scan (paper Sec. 3.3), forward and backward, in place on fp32 states.

Forward: H_c = exp(acum_last_c) H_{c-1} + S_c. Slot c of the [b, nc + 1, h, p, n] buffer holds S_c on
entry and the state entering chunk c on exit; slot nc receives the final state.
Backward: G_c (gradient of H_c) runs backwards, G_{c-1} = dHout_c + exp(acum_last_c) G_c. Slot c of the
[b, nc, h, p, n] gradient buffer holds dHout_c on entry and G_c on exit; G_{-1} is d(initial_state).
E_c = <G_c, exp(acum_last_c) H_{c-1}>, the part of the log-decay gradient that reaches every step of
chunk c through the carried-in state, is written as one partial sum per program block.
The loops are latency bound (one dependent step per chunk): each iteration issues the loads of 8
chunks before the first of its 8 steps, so a memory round trip is paid once per 8 chunks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from m4v.ops.triton_ssd.reductions import SUM


@triton.jit
def _fwd_slot(base, last, c, NC, s_c, m, offs, Q: tl.constexpr):
    """Local state S_c, decay exp(acum_last_c) and the slot's store mask; zero / one past the last chunk."""
    ok = m & ((offs * 0 + c) < NC)
    s = tl.load(base + c * s_c, mask=ok, other=0.0)
    d = tl.exp(tl.load(last + tl.where(c < NC, c, NC - 1) * Q))
    return s, tl.where(c < NC, d, 1.0), ok


@triton.jit
def _bwd_slot(d_base, s_base, last, c, s_d, s_s, m, offs, Q: tl.constexpr):
    """dHout_c, entering state H_{c-1}, decay and store mask; zero / one before the first chunk."""
    ok = m & ((offs * 0 + c) >= 0)
    o = tl.load(d_base + c * s_d, mask=ok, other=0.0)
    e = tl.load(s_base + c * s_s, mask=ok, other=0.0)
    d = tl.exp(tl.load(last + tl.where(c >= 0, c, 0) * Q))
    return o, e, tl.where(c >= 0, d, 1.0), ok


@triton.jit
def state_fwd_kernel(
    st_ptr, acum_ptr, init_ptr,
    H, PN, LP, NC,
    s_st_b, s_st_c, s_st_h,
    HAS_INIT: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(p * n, BLOCK), b * h)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_INIT:
        state = tl.load(init_ptr + pid_bh.to(tl.int64) * PN + offs, mask=m, other=0.0).to(tl.float32)
    else:
        state = tl.full((BLOCK,), 0.0, tl.float32)
    base = st_ptr + b.to(tl.int64) * s_st_b + h * s_st_h + offs
    last = acum_ptr + pid_bh.to(tl.int64) * LP + Q - 1  # + c * Q: total log decay of chunk c
    for c in range(0, NC, 8):
        s0, d0, k0 = _fwd_slot(base, last, c, NC, s_st_c, m, offs, Q)
        s1, d1, k1 = _fwd_slot(base, last, c + 1, NC, s_st_c, m, offs, Q)
        s2, d2, k2 = _fwd_slot(base, last, c + 2, NC, s_st_c, m, offs, Q)
        s3, d3, k3 = _fwd_slot(base, last, c + 3, NC, s_st_c, m, offs, Q)
        s4, d4, k4 = _fwd_slot(base, last, c + 4, NC, s_st_c, m, offs, Q)
        s5, d5, k5 = _fwd_slot(base, last, c + 5, NC, s_st_c, m, offs, Q)
        s6, d6, k6 = _fwd_slot(base, last, c + 6, NC, s_st_c, m, offs, Q)
        s7, d7, k7 = _fwd_slot(base, last, c + 7, NC, s_st_c, m, offs, Q)
        tl.store(base + c * s_st_c, state, mask=k0)
        state = d0 * state + s0
        tl.store(base + (c + 1) * s_st_c, state, mask=k1)
        state = d1 * state + s1
        tl.store(base + (c + 2) * s_st_c, state, mask=k2)
        state = d2 * state + s2
        tl.store(base + (c + 3) * s_st_c, state, mask=k3)
        state = d3 * state + s3
        tl.store(base + (c + 4) * s_st_c, state, mask=k4)
        state = d4 * state + s4
        tl.store(base + (c + 5) * s_st_c, state, mask=k5)
        state = d5 * state + s5
        tl.store(base + (c + 6) * s_st_c, state, mask=k6)
        state = d6 * state + s6
        tl.store(base + (c + 7) * s_st_c, state, mask=k7)
        state = d7 * state + s7
    tl.store(base + NC * s_st_c, state, mask=m)


@triton.jit
def state_bwd_kernel(
    dst_ptr, st_ptr, acum_ptr, dfinal_ptr, dinit_ptr, e_ptr,
    H, PN, LP, NC, NBLK,
    s_st_b, s_st_c, s_st_h,
    s_d_b, s_d_c, s_d_h,
    HAS_DFINAL: tl.constexpr, HAS_DINIT: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(p * n, BLOCK), b * h); e_ptr is [b * h, 8 + nc, NBLK] partial sums (8 leading pad slots)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_DFINAL:
        g = tl.load(dfinal_ptr + pid_bh.to(tl.int64) * PN + offs, mask=m, other=0.0).to(tl.float32)
    else:
        g = tl.full((BLOCK,), 0.0, tl.float32)
    d_base = dst_ptr + b.to(tl.int64) * s_d_b + h * s_d_h + offs
    s_base = st_ptr + b.to(tl.int64) * s_st_b + h * s_st_h + offs
    last = acum_ptr + pid_bh.to(tl.int64) * LP + Q - 1
    e_base = e_ptr + (pid_bh.to(tl.int64) * (NC + 8) + 8) * NBLK + pid  # slot c - k < 0 lands in the pad
    for cc in range(0, NC, 8):
        c = NC - 1 - cc
        o0, e0, d0, k0 = _bwd_slot(d_base, s_base, last, c, s_d_c, s_st_c, m, offs, Q)
        o1, e1, d1, k1 = _bwd_slot(d_base, s_base, last, c - 1, s_d_c, s_st_c, m, offs, Q)
        o2, e2, d2, k2 = _bwd_slot(d_base, s_base, last, c - 2, s_d_c, s_st_c, m, offs, Q)
        o3, e3, d3, k3 = _bwd_slot(d_base, s_base, last, c - 3, s_d_c, s_st_c, m, offs, Q)
        o4, e4, d4, k4 = _bwd_slot(d_base, s_base, last, c - 4, s_d_c, s_st_c, m, offs, Q)
        o5, e5, d5, k5 = _bwd_slot(d_base, s_base, last, c - 5, s_d_c, s_st_c, m, offs, Q)
        o6, e6, d6, k6 = _bwd_slot(d_base, s_base, last, c - 6, s_d_c, s_st_c, m, offs, Q)
        o7, e7, d7, k7 = _bwd_slot(d_base, s_base, last, c - 7, s_d_c, s_st_c, m, offs, Q)
        tl.store(e_base + c * NBLK, tl.reduce(g * e0, 0, SUM) * d0)
        tl.store(d_base + c * s_d_c, g, mask=k0)
        g = o0 + d0 * g
        tl.store(e_base + (c - 1) * NBLK, tl.reduce(g * e1, 0, SUM) * d1)
        tl.store(d_base + (c - 1) * s_d_c, g, mask=k1)
        g = o1 + d1 * g
        tl.store(e_base + (c - 2) * NBLK, tl.reduce(g * e2, 0, SUM) * d2)
        tl.store(d_base + (c - 2) * s_d_c, g, mask=k2)
        g = o2 + d2 * g
        tl.store(e_base + (c - 3) * NBLK, tl.reduce(g * e3, 0, SUM) * d3)
        tl.store(d_base + (c - 3) * s_d_c, g, mask=k3)
        g = o3 + d3 * g
        tl.store(e_base + (c - 4) * NBLK, tl.reduce(g * e4, 0, SUM) * d4)
        tl.store(d_base + (c - 4) * s_d_c, g, mask=k4)
        g = o4 + d4 * g
        tl.store(e_base + (c - 5) * NBLK, tl.reduce(g * e5, 0, SUM) * d5)
        tl.store(d_base + (c - 5) * s_d_c, g, mask=k5)
        g = o5 + d5 * g
        tl.store(e_base + (c - 6) * NBLK, tl.reduce(g * e6, 0, SUM) * d6)
        tl.store(d_base + (c - 6) * s_d_c, g, mask=k6)
        g = o6 + d6 * g
        tl.store(e_base + (c - 7) * NBLK, tl.reduce(g * e7, 0, SUM) * d7)
        tl.store(d_base + (c - 7) * s_d_c, g, mask=k7)
        g = o7 + d7 * g
    if HAS_DINIT:
        tl.store(dinit_ptr + pid_bh.to(tl.int64) * PN + offs, g, mask=m)
