"""Benchmark of the SSD scan backends (MM-DiM mixer, paper Sec. 3.3): Triton vs pure torch vs fla / mamba_ssm.

One command on a CUDA machine, e.g. ``PYTHONPATH=. python3 benchmarks/bench_ssd.py --out ssd.json``.
fla (``fla-core``, pure Python) and mamba_ssm (a wheel built without its CUDA extensions) are carried as
wheels for this benchmark only; without them their rows say "not importable".
Times are medians of triton.testing.do_bench (ms); correctness is the relative RMS error against the
pure-torch path run in float32 on the same (bf16) inputs. A short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment  # noqa: E402

from m4v.ops.ssd import ssd_torch  # noqa: E402

SHAPES = [  # (heads, groups, headdim, d_state)
    (30, 30, 64, 64),  # paper config: one group per head, d_state = head dim
    (30, 1, 64, 128),  # Mamba2 default grouping: one shared B/C, d_state 128
]
GRADS = ("x", "dt", "A", "B", "C", "D", "dt_bias")
DEVICE = "cuda"


def make_inputs(l: int, h: int, g: int, p: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Mamba2-like inputs (b = 1): bf16 x / B / C, raw dt with an inverse-softplus bias, A in [-16, -1]."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    dev = DEVICE

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=dev) * scale

    dt0 = torch.exp(torch.rand(h, generator=gen, device=dev) * (2.3 - 6.9) - 2.3)
    return {
        "x": rnd(1, l, h, p).bfloat16(),
        "dt": rnd(1, l, h, scale=0.5).bfloat16(),
        "A": -torch.exp(torch.rand(h, generator=gen, device=dev) * 2.77),
        "B": rnd(1, l, g, n).bfloat16(),
        "C": rnd(1, l, g, n).bfloat16(),
        "D": rnd(h),
        "dt_bias": dt0 + torch.log(-torch.expm1(-dt0)),
    }


def bench_ms(fn: Callable[[], object], warmup: int, rep: int, grad_to_none: list[torch.Tensor] | None = None) -> float:
    import triton

    res = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=[0.5])
    return float(res[0] if isinstance(res, (list, tuple)) else res)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_ssd(fn: Callable[..., object], inp: dict[str, torch.Tensor], grads: bool):
    """Forward (and backward with a fixed cotangent) of an ssd-convention callable; returns (y, grads)."""
    leaves = {k: v.detach().clone().requires_grad_(grads) for k, v in inp.items()}
    y = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
           dt_bias=leaves["dt_bias"], dt_softplus=True, chunk_size=256)  # fmt: skip
    if not grads:
        return y, {}
    gen = torch.Generator(device=DEVICE).manual_seed(123)
    gy = torch.randn(y.shape, generator=gen, device=DEVICE).to(y.dtype)
    y.backward(gy)
    return y.detach(), {k: leaves[k].grad for k in GRADS}


def processed_dt(inp: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.softplus(inp["dt"].float() + inp["dt_bias"])


def fla_forward(inp: dict[str, torch.Tensor], h: int, g: int):
    """fla's chunk_simple_gla with q = C, k = B (expanded to heads), v = x * dt, g = A * dt; returns a closure."""
    from fla.ops.simple_gla import chunk_simple_gla

    d = processed_dt(inp)
    q = inp["C"].repeat_interleave(h // g, dim=2).contiguous()
    k = inp["B"].repeat_interleave(h // g, dim=2).contiguous()
    v = (inp["x"].float() * d[..., None]).bfloat16()
    gate = (d * inp["A"]).contiguous()

    def fn() -> torch.Tensor:
        return chunk_simple_gla(q, k, v, g=gate, scale=1.0)[0]

    return fn


def mamba_fn():
    # A pure-Python build of mamba_ssm (MAMBA_SKIP_CUDA_BUILD: its Triton SSD only) lacks the compiled
    # selective-scan extension that the package __init__ imports; it is never called here, so stand in for it.
    import types

    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined


def bench_shape(l: int, h: int, g: int, p: int, n: int, args: argparse.Namespace) -> dict:
    from m4v.ops.ssd_triton import ssd_triton

    res: dict = {"l": l, "h": h, "g": g, "p": p, "n": n, "ms": {}, "rel_err": {}, "errors": {}}
    inp = make_inputs(l, h, g, p, n, seed=l + g)
    ms, err, errors = res["ms"], res["rel_err"], res["errors"]

    # reference: the torch path in float32 on the same bf16 inputs
    try:
        ref_inp = {k: v.float() for k, v in inp.items()}
        y_ref, g_ref = run_ssd(ssd_torch, ref_inp, grads=True)
    except torch.OutOfMemoryError as e:
        y_ref, g_ref = None, {}
        errors["reference"] = f"OOM: {str(e)[:200]}"
    torch.cuda.empty_cache()

    def record(name: str, fn: Callable[..., object]) -> None:
        try:
            y, grads = run_ssd(fn, inp, grads=True)
            if y_ref is not None:
                err[f"{name}_y"] = rel(y, y_ref)
                for k, v in grads.items():
                    err[f"{name}_d{k}"] = rel(v, g_ref[k])
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
            plain = {k: v.detach() for k, v in inp.items()}
            gy = torch.randn_like(y)

            def fwd() -> object:
                return fn(plain["x"], plain["dt"], plain["A"], plain["B"], plain["C"], D=plain["D"],
                          dt_bias=plain["dt_bias"], dt_softplus=True, chunk_size=256)  # fmt: skip

            def fwd_bwd() -> None:
                out = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
                         dt_bias=leaves["dt_bias"], dt_softplus=True, chunk_size=256)  # fmt: skip
                out.backward(gy)

            ms[f"{name}_fwd"] = bench_ms(fwd, args.warmup, args.rep)
            ms[f"{name}_fwdbwd"] = bench_ms(fwd_bwd, args.warmup, args.rep, grad_to_none=list(leaves.values()))
        except Exception as e:  # record and go on: one backend failing must not hide the others
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
        torch.cuda.empty_cache()

    record("triton", ssd_triton)
    if args.torch_max_len <= 0 or l <= args.torch_max_len:
        record("torch", ssd_torch)
    try:
        fwd = fla_forward(inp, h, g)
        y = fwd()
        if y_ref is not None:
            err["fla_y"] = rel(y.float() + inp["x"].float() * inp["D"][:, None], y_ref)
        ms["fla_fwd"] = bench_ms(fwd, args.warmup, args.rep)
    except ImportError as e:
        errors["fla"] = f"not importable: {e}"
    except Exception as e:
        errors["fla"] = f"{type(e).__name__}: {str(e)[:300]}"
    try:
        record("mamba", mamba_fn())
    except ImportError as e:
        errors["mamba"] = f"not importable: {e}"
    if args.breakdown:
        try:
            res["kernels_ms"] = kernel_breakdown(inp, args)
        except Exception as e:
            errors["breakdown"] = f"{type(e).__name__}: {str(e)[:300]}"
    y_ref, g_ref = None, {}  # free the reference before the next shape
    torch.cuda.empty_cache()
    return res


def kernel_breakdown(inp: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, float]:
    """Time each Triton launch of the forward and backward on its own (same buffers as a real call)."""
    from m4v.ops.triton_ssd import launch

    x, dt, A, B, C, D, bias = (inp[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias"))
    b, l, h, p = x.shape
    n = B.shape[3]
    q = 256
    nc = -(-l // q)
    dtp, acum = launch.dt_forward(dt, bias, A, True, q, nc)
    states = torch.empty(b, nc + 1, h, p, n, device=x.device, dtype=torch.float32)
    launch.chunk_states(x, B, dtp, acum, states, 0, q)
    launch.state_forward(states, acum, None, q)
    dy = torch.randn_like(x)
    dstates = torch.empty(b, nc, h, p, n, device=x.device, dtype=torch.float32)
    launch.chunk_states(dy, C, dtp, acum, dstates, 1, q)
    _, e = launch.state_backward(dstates, states, acum, None, False, q)
    cols = launch.bwd_cols(x, B, C, dy, dtp, acum, dstates, D, q)
    _, qv = launch.bwd_rows(x, B, C, dy, dtp, acum, states, q)
    scratch = states.clone()
    dscratch = dstates.clone()
    w, rep = args.warmup, args.rep
    return {
        "fwd_dt": bench_ms(lambda: launch.dt_forward(dt, bias, A, True, q, nc), w, rep),
        "fwd_chunk_state": bench_ms(lambda: launch.chunk_states(x, B, dtp, acum, scratch, 0, q), w, rep),
        "fwd_state_passing": bench_ms(lambda: launch.state_forward(scratch, acum, None, q), w, rep),
        "fwd_chunk_scan": bench_ms(lambda: launch.chunk_scan_forward(x, None, B, C, dtp, acum, states, D, q), w, rep),
        "bwd_chunk_state": bench_ms(lambda: launch.chunk_states(dy, C, dtp, acum, dscratch, 1, q), w, rep),
        "bwd_state_passing": bench_ms(lambda: launch.state_backward(dscratch, states, acum, None, False, q), w, rep),
        "bwd_cols": bench_ms(lambda: launch.bwd_cols(x, B, C, dy, dtp, acum, dstates, D, q), w, rep),
        "bwd_rows": bench_ms(lambda: launch.bwd_rows(x, B, C, dy, dtp, acum, states, q), w, rep),
        "bwd_dt": bench_ms(lambda: launch.dt_backward(dt, bias, A, True, dtp, cols, qv, e, q), w, rep),
    }


def profile_overhead(l: int, h: int, g: int, p: int, n: int) -> dict[str, object]:
    """Host vs device time of one Triton forward + backward (torch.profiler): where short sequences go."""
    from torch.profiler import ProfilerActivity, profile

    from m4v.ops.ssd_triton import ssd_triton

    inp = make_inputs(l, h, g, p, n, seed=7)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    gy = torch.randn(1, l, h, p, device=DEVICE, dtype=torch.bfloat16)

    def step() -> None:
        y = ssd_triton(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
                       dt_bias=leaves["dt_bias"], dt_softplus=True, chunk_size=256)  # fmt: skip
        y.backward(gy)
        for v in leaves.values():
            v.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    reps = 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
    totals = table_totals_ms(table)
    return {"l": l, "g": g, "reps": reps, "host_ms_per_step": totals.get("CPU", float("nan")) / reps,
            "device_ms_per_step": totals.get("CUDA", float("nan")) / reps, "table": table}  # fmt: skip


def table_totals_ms(table: str) -> dict[str, float]:
    """The 'Self CPU / CUDA time total' lines of a profiler table, in ms."""
    out = {}
    for line in table.splitlines():
        for kind in ("CPU", "CUDA"):
            head = f"Self {kind} time total: "
            if line.startswith(head):
                val = line[len(head) :].strip()
                scale = 1e-3 if val.endswith("us") else 1e3 if val.endswith("s") and not val.endswith("ms") else 1.0
                out[kind] = float(val.rstrip("mus")) * scale
    return out


def fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="path of the JSON results file")
    ap.add_argument("--lengths", default="3968,15488,65536", help="comma-separated sequence lengths")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--shapes", default="0,1", help="indices into SHAPES, comma-separated (0: paper, 1: g=1)")
    ap.add_argument("--torch-max-len", type=int, default=0, help="skip the torch path above this length (0: never)")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip per-kernel timings")
    ap.add_argument("--profile", action="store_true", help="profile host vs device time at the first length")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_ssd.py needs a CUDA device.")

    from m4v.ops.triton_ssd import launch

    lengths = [int(v) for v in args.lengths.split(",") if v]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        **environment(),  # device, torch, triton, date, commit (M4V_COMMIT where the copy has no git), command
        "dtype": "bfloat16",
        "batch": 1,
        "chunk_size": 256,
        "inputs": "D [h], dt_bias + softplus, no z; rel_err vs the torch path in float32 on the same inputs",
        "results": [],
    }
    results = report["results"]
    for h, g, p, n in [SHAPES[int(i)] for i in args.shapes.split(",")]:
        for l in lengths:
            r = bench_shape(l, h, g, p, n, args)
            results.append(r)
            print(json.dumps({k: r[k] for k in ("l", "g", "n", "ms", "errors")}), flush=True)
            report["tuned_configs"] = {repr(k): v for k, v in launch._TUNED.items()}
            report["tuning_log_ms"] = {repr(k): [[c, round(t, 4)] for c, t in v] for k, v in launch.TUNE_LOG.items()}
            out.write_text(json.dumps(report, indent=1))  # after every shape, so a cut-off run keeps its results
    if args.profile:
        try:
            h, g, p, n = SHAPES[0]
            report["profile"] = profile_overhead(lengths[0], h, g, p, n)
            print(report["profile"]["table"])
        except Exception as e:
            report["profile"] = f"{type(e).__name__}: {str(e)[:300]}"
        out.write_text(json.dumps(report, indent=1))
    cols = ["triton_fwd", "triton_fwdbwd", "torch_fwd", "torch_fwdbwd", "fla_fwd", "mamba_fwd", "mamba_fwdbwd"]
    print(f"\n{report['device']}  torch {report['torch']}  triton {report['triton']}  (ms, median; bf16, b=1)")
    print(f"{'l':>6} {'h':>3} {'g':>3} {'n':>4} " + " ".join(f"{c:>13}" for c in cols) + "   max_rel_err(triton)")
    for r in results:
        tri = [v for k, v in r["rel_err"].items() if k.startswith("triton_")]
        worst = f"{max(tri):.2e}" if tri else "-"
        print(f"{r['l']:>6} {r['h']:>3} {r['g']:>3} {r['n']:>4} " + " ".join(f"{fmt(r['ms'].get(c)):>13}" for c in cols)
              + f"   {worst}")  # fmt: skip
    for r in results:
        if r["errors"]:
            print(f"l={r['l']} g={r['g']}: {r['errors']}")


if __name__ == "__main__":
    main()
