"""Launchers of the SSD Triton kernels (paper Sec. 3.3): buffers, grids, block sizes and a small tuner.

Block shapes are picked per problem key by timing a few configurations once (``TUNING["autotune"]``,
env M4V_SSD_TRITON_TUNE=0 turns it off); under TRITON_INTERPRET=1 fixed small blocks are used. Problems
smaller than ``TUNING["min_tune_elements"]`` (x elements) take the first configuration untimed: timing means
compiling every configuration (on the H100, the first full_temp step of the shipped 128x128 model spent
117 s there), which a scan of a few hundred tokens never pays back.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton

from m4v.ops.triton_host import CachedLaunch, cdiv, interpreting, next_pow2
from m4v.ops.triton_ssd.chunk_scan import chunk_scan_fwd_kernel
from m4v.ops.triton_ssd.chunk_scan_bwd import bwd_cols_kernel, bwd_rows_kernel, gate_bwd_kernel
from m4v.ops.triton_ssd.chunk_state import chunk_state_kernel
from m4v.ops.triton_ssd.dt_kernels import dt_bwd_kernel, dt_fwd_kernel
from m4v.ops.triton_ssd.state_passing import state_bwd_kernel, state_fwd_kernel

# launched through their compiled kernels after the first call of each signature (m4v.ops.triton_host)
_chunk_scan_fwd_kernel = CachedLaunch(chunk_scan_fwd_kernel)
_bwd_cols_kernel = CachedLaunch(bwd_cols_kernel)
_bwd_rows_kernel = CachedLaunch(bwd_rows_kernel)
_gate_bwd_kernel = CachedLaunch(gate_bwd_kernel)
_chunk_state_kernel = CachedLaunch(chunk_state_kernel)
_dt_bwd_kernel = CachedLaunch(dt_bwd_kernel)
_dt_fwd_kernel = CachedLaunch(dt_fwd_kernel)
_state_bwd_kernel = CachedLaunch(state_bwd_kernel)
_state_fwd_kernel = CachedLaunch(state_fwd_kernel)

Config = dict[str, int]

TUNING: dict[str, object] = {
    "autotune": os.environ.get("M4V_SSD_TRITON_TUNE", "1") != "0",
    "min_programs": None,  # head-split target for the backward; None: 4 x multiprocessors (1 when interpreting)
    "interpret_block": 16,  # row / key block under TRITON_INTERPRET=1
    "min_tune_elements": 1 << 21,  # smaller problems (b * l * h * p) use the first configuration untimed
}

_STATE_CFGS: list[Config] = [
    {"BK": 64, "num_warps": 4, "num_stages": 2},
    {"BK": 64, "num_warps": 8, "num_stages": 2},
    {"BK": 128, "num_warps": 8, "num_stages": 2},
    {"BK": 32, "num_warps": 4, "num_stages": 3},
    {"BK": 64, "num_warps": 4, "num_stages": 3},
]
_SCAN_CFGS: list[Config] = [
    {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
    {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 3},
    {"BM": 64, "BN": 32, "num_warps": 4, "num_stages": 2},
    {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 2},
    {"BM": 128, "BN": 32, "num_warps": 8, "num_stages": 2},
    {"BM": 64, "BN": 64, "num_warps": 8, "num_stages": 2},
    {"BM": 128, "BN": 64, "num_warps": 4, "num_stages": 2},
    {"BM": 64, "BN": 32, "num_warps": 4, "num_stages": 3},
    {"BM": 64, "BN": 32, "num_warps": 4, "num_stages": 4},
    {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 3},
]
_BWD_CFGS: list[Config] = [
    {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
    {"BM": 64, "BN": 64, "num_warps": 8, "num_stages": 2},
    {"BM": 32, "BN": 64, "num_warps": 4, "num_stages": 2},
    {"BM": 64, "BN": 32, "num_warps": 4, "num_stages": 2},
    {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 2},
    {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 1},
    {"BM": 32, "BN": 64, "num_warps": 8, "num_stages": 2},
    {"BM": 32, "BN": 64, "num_warps": 4, "num_stages": 3},
    {"BM": 64, "BN": 32, "num_warps": 4, "num_stages": 1},
    {"BM": 32, "BN": 64, "num_warps": 4, "num_stages": 1},
]
_TUNED: dict[tuple, Config] = {}
TUNE_LOG: dict[tuple, list[tuple[Config, float]]] = {}  # every timing taken by the tuner (ms; inf: failed)


def _pow2(v: int) -> int:
    return max(16, next_pow2(v))


def _prec(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots; bf16 / fp16 dots run on the tensor cores with fp32 accumulation."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _fit(cfgs: list[Config], q: int) -> list[Config]:
    """Clamp block sizes to the chunk length, dropping duplicates."""
    out: list[Config] = []
    for cfg in cfgs:
        c = {k: (min(v, q) if k in ("BK", "BM", "BN") else v) for k, v in cfg.items()}
        if c not in out:
            out.append(c)
    return out


def _bench_ms(fn: Callable[[], None]) -> float:
    res = triton.testing.do_bench(fn, warmup=3, rep=15, quantiles=[0.5])
    return float(res[0] if isinstance(res, (list, tuple)) else res)


def _pick(
    name: str, key: tuple, cfgs: list[Config], q: int, run: Callable[[Config], None], elements: int
) -> Config:
    """Block config for a problem key: fixed small blocks when interpreting, the first config when not
    tuning or for a problem of fewer than ``min_tune_elements`` x elements, else the fastest of ``cfgs``
    (timed once per key, cached)."""
    if interpreting():
        b = int(TUNING["interpret_block"])  # type: ignore[arg-type]
        return {k: (b if k in ("BK", "BM", "BN") else v) for k, v in cfgs[0].items()}
    small = elements < int(TUNING["min_tune_elements"])  # type: ignore[call-overload]
    full = (name, q, small, *key)
    cfg = _TUNED.get(full)
    if cfg is None:
        fitted = _fit(cfgs, q)
        tune = TUNING["autotune"] and not small and len(fitted) > 1
        cfg = _tune(full, fitted, run) if tune else fitted[0]
        _TUNED[full] = cfg
    return cfg


def _tune(full: tuple, cfgs: list[Config], run: Callable[[Config], None]) -> Config:
    best, best_ms = cfgs[0], float("inf")
    log = TUNE_LOG.setdefault(full, [])
    for cfg in cfgs:
        try:
            ms = _bench_ms(lambda cfg=cfg: run(cfg))
        except Exception:  # a config the compiler rejects (shared memory, registers) is skipped
            ms = float("inf")
        log.append((cfg, ms))
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best


def _launch_opts(cfg: Config) -> dict[str, int]:
    if interpreting():
        return {}
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _blocks(cfg: Config) -> dict[str, int]:
    return {k: v for k, v in cfg.items() if k in ("BK", "BM", "BN")}


def head_splits(batch: int, groups: int, heads_per_group: int, nc: int, q: int, device: torch.device) -> int:
    """Number of head splits per group in the backward: the smallest divisor of h/g giving enough programs."""
    target = TUNING["min_programs"]
    if target is None:
        target = 1 if interpreting() or device.type != "cuda" else 4 * _sm_count(device)
    blocks = batch * groups * nc * max(1, q // 64)
    for ns in range(1, heads_per_group + 1):
        if heads_per_group % ns == 0 and blocks * ns >= int(target):  # type: ignore[arg-type]
            return ns
    return heads_per_group


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def dt_forward(
    dt: torch.Tensor, dt_bias: torch.Tensor | None, A: torch.Tensor, softplus: bool, q: int, nc: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Processed dt and in-chunk cumsum of dt * A, both fp32 [b, h, nc * q]."""
    b, l, h = dt.shape
    lp = nc * q
    dtp = torch.empty(b, h, lp, device=dt.device, dtype=torch.float32)
    acum = torch.empty_like(dtp)
    bias = dt_bias if dt_bias is not None else A
    _dt_fwd_kernel[(nc, b * h)](
        dt, bias, A, dtp, acum, l, h, lp, *dt.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus, Q=q,
    )  # fmt: skip
    return dtp, acum


def chunk_states(
    u: torch.Tensor, v: torch.Tensor, dtp: torch.Tensor, acum: torch.Tensor, out: torch.Tensor, mode: int, q: int
) -> None:
    """Write the per-chunk [p, n] reductions (see chunk_state.py) into slots 0..nc-1 of out [b, slots, h, p, n]."""
    b, l, h, p = u.shape
    g, n = v.shape[2], v.shape[3]
    nc = dtp.shape[2] // q
    bp, bk = _pow2(p), _pow2(n)

    def run(cfg: Config) -> None:
        _chunk_state_kernel[(nc, b * h, 1)](
            u, v, dtp, acum, out, l, h, h // g, p, n, dtp.shape[2],
            *u.stride(), *v.stride(), out.stride(0), out.stride(1), out.stride(2),
            MODE=mode, Q=q, BK=cfg["BK"], BP=bp, BN=bk, PREC=_prec(u.dtype), **_launch_opts(cfg),
        )  # fmt: skip

    cfg = _pick("state", (mode, p, n, u.dtype, l > 8192), _STATE_CFGS, q, run, u.numel())
    run(cfg)


def _state_block(pn: int) -> int:
    return min(256, next_pow2(pn))


def state_forward(states: torch.Tensor, acum: torch.Tensor, init: torch.Tensor | None, q: int) -> None:
    """In place on states [b, nc + 1, h, p, n]: local chunk states -> entering states, final in slot nc."""
    b, slots, h, p, n = states.shape
    pn = p * n
    block = _state_block(pn)
    init_t = init if init is not None else states
    _state_fwd_kernel[(cdiv(pn, block), b * h)](
        states, acum, init_t, h, pn, acum.shape[2], slots - 1, states.stride(0), states.stride(1), states.stride(2),
        HAS_INIT=init is not None, Q=q, BLOCK=block,
    )  # fmt: skip


def state_backward(
    dstates: torch.Tensor, states: torch.Tensor, acum: torch.Tensor, dfinal: torch.Tensor | None,
    want_dinit: bool, q: int,
) -> tuple[torch.Tensor | None, torch.Tensor]:  # fmt: skip
    """In place on dstates [b, nc, h, p, n]: dHout -> gradient of each chunk's end state.

    Returns (d initial_state or None, E_c = <G_c, exp(acum_last_c) H_{c-1}> [b, h, nc]).
    """
    b, nc, h, p, n = dstates.shape
    pn = p * n
    block = _state_block(pn)
    nblk = cdiv(pn, block)
    e = torch.empty(b * h, nc + 8, nblk, device=dstates.device, dtype=torch.float32)  # 8 pad slots in front
    dinit = torch.empty(b, h, p, n, device=dstates.device, dtype=torch.float32) if want_dinit else None
    _state_bwd_kernel[(nblk, b * h)](
        dstates, states, acum, dfinal if dfinal is not None else dstates, dinit if dinit is not None else dstates,
        e, h, pn, acum.shape[2], nc, nblk, states.stride(0), states.stride(1), states.stride(2),
        dstates.stride(0), dstates.stride(1), dstates.stride(2),
        HAS_DFINAL=dfinal is not None, HAS_DINIT=want_dinit, Q=q, BLOCK=block,
    )  # fmt: skip
    return dinit, e[:, 8:].sum(-1).view(b, h, nc)


def chunk_scan_forward(
    x: torch.Tensor, z: torch.Tensor | None, B: torch.Tensor, C: torch.Tensor, dtp: torch.Tensor,
    acum: torch.Tensor, states: torch.Tensor, D: torch.Tensor | None, q: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Gated output [b, l, h, p] in x's dtype, and the pre-gate output when z is given."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nc = dtp.shape[2] // q
    out = torch.empty(b, l, h, p, device=x.device, dtype=x.dtype)
    ypre = torch.empty_like(out) if z is not None else None
    zz = z if z is not None else x
    dd = D if D is not None else x

    def run(cfg: Config) -> None:
        _chunk_scan_fwd_kernel[(q // cfg["BM"], nc, b * h)](
            x, zz, B, C, dtp, acum, states, dd, out, ypre if ypre is not None else out,
            l, h, h // g, p, n, dtp.shape[2],
            *x.stride(), *zz.stride(), *B.stride(), *C.stride(), states.stride(0), states.stride(1), states.stride(2),
            HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
            Q=q, BP=_pow2(p), BK=_pow2(n), PREC=_prec(x.dtype), **_blocks(cfg), **_launch_opts(cfg),
        )  # fmt: skip

    cfg = _pick("scan", (p, n, x.dtype, z is not None, l > 8192), _SCAN_CFGS, q, run, x.numel())
    run(cfg)
    return out, ypre


def gate_backward(dout: torch.Tensor, z: torch.Tensor, ypre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients through out = y * silu(z): (d y in y's dtype, d z in z's dtype)."""
    dout = dout.contiguous()
    zc = z.contiguous()
    dy = torch.empty_like(ypre)
    dz = torch.empty_like(zc)
    numel = dout.numel()
    block = 1024
    _gate_bwd_kernel[(cdiv(numel, block),)](dout, zc, ypre, dy, dz, numel, BLOCK=block)
    return dy, dz


class ColsGrads:
    """Outputs of the column-side backward kernel (see chunk_scan_bwd.py)."""

    def __init__(self, dx: torch.Tensor, ddt: torch.Tensor, db: torch.Tensor, dd_blocks: torch.Tensor | None,
                 cs: torch.Tensor, rs: torch.Tensor, part: torch.Tensor) -> None:  # fmt: skip
        self.dx, self.ddt, self.db, self.cs, self.rs, self.part = dx, ddt, db, cs, rs, part
        self.dd_blocks = dd_blocks  # per-block partial D gradients [b, nc * key blocks, h, p]; sum for dD


def bwd_cols(
    x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dy: torch.Tensor, dtp: torch.Tensor, acum: torch.Tensor,
    dstates: torch.Tensor, D: torch.Tensor | None, q: int,
) -> ColsGrads:  # fmt: skip
    """dx (x's dtype), ddt / cs / part fp32 [b, h, lp], dB fp32 [b, l, g, n] (split-summed), per-block partial dD
    fp32 [b, blocks, h, p] or None (the caller sums it), rs fp32 [b * h * nc, q // BN, q] (row sums of the pair
    log-decay gradients, per key block)."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    lp = dtp.shape[2]
    nc = lp // q
    hpg = h // g
    ns = head_splits(b, g, hpg, nc, q, x.device)
    dev = x.device
    f32 = torch.float32
    dx = torch.empty(b, l, h, p, device=dev, dtype=x.dtype)
    ddt = torch.empty(b, h, lp, device=dev, dtype=f32)
    cs = torch.empty_like(ddt)
    part = torch.empty_like(ddt)
    db = torch.empty(ns, b, l, g, n, device=dev, dtype=f32)
    d_arg = D if D is not None else x

    def run(cfg: Config) -> tuple[torch.Tensor, torch.Tensor | None]:
        njb = q // cfg["BN"]
        rs = torch.empty(b * h * nc, njb, q, device=dev, dtype=f32)
        dd = torch.empty(b, nc * njb, h, p, device=dev, dtype=f32) if D is not None else None
        _bwd_cols_kernel[(njb, nc, b * g * ns)](
            x, B, C, dy, dtp, acum, dstates, d_arg, dx, ddt, db, dd if dd is not None else ddt, cs, rs, part,
            l, h, hpg, p, n, lp, ns,
            *x.stride(), *B.stride(), *C.stride(), *dy.stride(),
            dstates.stride(0), dstates.stride(1), dstates.stride(2), db.stride(0), db.stride(1), db.stride(2),
            HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HPS=hpg // ns,
            Q=q, BP=_pow2(p), BK=_pow2(n), PREC=_prec(x.dtype), **_blocks(cfg), **_launch_opts(cfg),
        )  # fmt: skip
        return rs, dd

    cfg = _pick("cols", (p, n, x.dtype, hpg, ns, D is not None, l > 8192), _BWD_CFGS, q, run, x.numel())
    rs, dd = run(cfg)
    db_sum = db[0] if ns == 1 else db.sum(0)
    return ColsGrads(dx, ddt, db_sum, dd, cs, rs, part)


def bwd_rows(
    x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dy: torch.Tensor, dtp: torch.Tensor, acum: torch.Tensor,
    states: torch.Tensor, q: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dC fp32 [b, l, g, n] (split-summed), q fp32 [b, h, lp]: log-decay gradient of the carried-in state)."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    lp = dtp.shape[2]
    nc = lp // q
    hpg = h // g
    ns = head_splits(b, g, hpg, nc, q, x.device)
    dc = torch.empty(ns, b, l, g, n, device=x.device, dtype=torch.float32)
    qv = torch.empty(b, h, lp, device=x.device, dtype=torch.float32)

    def run(cfg: Config) -> None:
        _bwd_rows_kernel[(q // cfg["BM"], nc, b * g * ns)](
            x, B, C, dy, dtp, acum, states, dc, qv,
            l, h, hpg, p, n, lp, ns,
            *x.stride(), *B.stride(), *C.stride(), *dy.stride(),
            states.stride(0), states.stride(1), states.stride(2), dc.stride(0), dc.stride(1), dc.stride(2),
            HPS=hpg // ns, Q=q, BP=_pow2(p), BK=_pow2(n), PREC=_prec(x.dtype), **_blocks(cfg), **_launch_opts(cfg),
        )  # fmt: skip

    cfg = _pick("rows", (p, n, x.dtype, hpg, ns, l > 8192), _BWD_CFGS, q, run, x.numel())
    run(cfg)
    return (dc[0] if ns == 1 else dc.sum(0)), qv


def dt_backward(
    dt: torch.Tensor, dt_bias: torch.Tensor | None, A: torch.Tensor, softplus: bool, dtp: torch.Tensor,
    cols: ColsGrads, qv: torch.Tensor, e: torch.Tensor, q: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(gradient of the raw dt, fp32 [b, l, h]; dA fp32 [h]); e is E_c [b, h, nc] from state_backward."""
    b, l, h = dt.shape
    lp = dtp.shape[2]
    nc = lp // q
    ddt_raw = torch.empty(b, l, h, device=dt.device, dtype=torch.float32)
    da = torch.empty(b, h, nc, device=dt.device, dtype=torch.float32)
    bias = dt_bias if dt_bias is not None else A
    _dt_bwd_kernel[(nc, b * h)](
        dt, bias, A, dtp, cols.ddt, cols.rs, cols.cs, qv, cols.part, e.contiguous(), ddt_raw, da,
        l, h, lp, nc, cols.rs.shape[1], *dt.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus, Q=q,
    )  # fmt: skip
    return ddt_raw, da.sum((0, 2))
