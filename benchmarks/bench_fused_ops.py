"""Issue 5: eager torch references vs the compiled fused ops of m4v.ops.fused by size (``FUSED_MIN_NUMEL``).

For each op, width D (heads of 64) and token count N (batch 2, bf16 activations, float32 norm weights and RoPE
tables as the layers pass them under autocast) this times the reference (``*_ref``) and its compiled form
(``fused._compiled(ref, "inductor")``, what the dispatch runs on CUDA), forward (no_grad) and forward+backward
(gradients of all activations and weights for a random grad_output). Timing for host-bound work: R calls launched
back to back, one synchronisation at the end; ms per call = total / R = max(host, GPU) time per call, with R at
least --min-calls and --min-ms long; median of --reps repetitions, after warm-up at every shape. The crossover
of an op and direction is the smallest numel of its main input from which the compiled op is faster at every
larger size measured (both widths pooled); FUSED_MIN_NUMEL is set from it.

    PYTHONPATH=. python benchmarks/bench_fused_ops.py                  # -> results/fused_ops_<gpu>.json
    PYTHONPATH=. python benchmarks/bench_fused_ops.py --ops qkv_heads --widths 192 --out qkv_h100.json
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, write_json  # noqa: E402

import m4v.ops.fused as fused  # noqa: E402

OPS = ("rms_norm", "qkv_heads", "fold_heads", "ln_modulate", "gated_residual")
B, HEAD_DIM, T_FOLD, EPS = 2, 64, 4, 1e-6
DEVICE = "cuda"
KEYS = ("eager_fwd", "compiled_fwd", "eager_fwd_bwd", "compiled_fwd_bwd")


def make_args(op: str, D: int, N: int, grad: bool) -> tuple:
    """One call's arguments as the layers pass them: bf16 activations, float32 norm weights and RoPE tables."""
    dev, H = torch.device(DEVICE), D // HEAD_DIM

    def act(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16, requires_grad=grad)

    def weight(n: int) -> torch.Tensor:
        return (torch.rand(n, device=dev) + 0.5).requires_grad_(grad)

    if op == "rms_norm":  # RMSNorm over the model width (Wan's q/k norm)
        return act(B, N, D), weight(D), EPS
    if op == "qkv_heads":  # one attention sequence: qkv projection [B, N, 3D], tables [N, d / 2]
        angles = torch.rand(N, HEAD_DIM // 2, device=dev) * 100
        return [act(B, N, 3 * D)], [weight(HEAD_DIM)], [weight(HEAD_DIM)], H, EPS, angles.cos(), angles.sin()
    if op == "fold_heads":  # temporal branch: T folded tokens of P = N / T positions
        return act(B, T_FOLD, N // T_FOLD, 3 * D), weight(HEAD_DIM), weight(HEAD_DIM), H, EPS
    if op == "ln_modulate":  # adaLN: shift and scale [B, D] from the modulation linear
        return act(B, N, D), act(B, D), act(B, D)
    return act(B, N, D), act(B, D), act(B, N, D), act(B, N, D)  # gated_residual of a single-stream block


def tensors(args: tuple) -> list[torch.Tensor]:
    flat = [t for a in args for t in (a if isinstance(a, list) else [a])]
    return [t for t in flat if isinstance(t, torch.Tensor)]


def per_call_ms(fn: Callable[[], object], reps: int, min_calls: int, min_ms: float) -> float:
    """Median over reps of (R calls back to back, one synchronisation) / R, in ms."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) / 10
    calls = max(min_calls, math.ceil(min_ms / 1e3 / max(est, 1e-7)))
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls)
    return 1e3 * statistics.median(times)


def measure(op: str, D: int, N: int, a: argparse.Namespace) -> dict:
    """The four timings (ms per call) of one op at one size; an error row when a call fails (e.g. out of memory)."""
    from torch._dynamo.utils import counters

    ref = getattr(fused, f"{op}_ref")
    fns = {"eager": ref, "compiled": fused._compiled(ref, "inductor")}
    fwd_args, bwd_args = make_args(op, D, N, grad=False), make_args(op, D, N, grad=True)
    leaves = [t for t in tensors(bwd_args) if t.requires_grad]  # activations and weights, not the RoPE tables
    with torch.no_grad():
        outs = ref(*fwd_args)
    grads = [torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]
    del outs
    row = dict(op=op, width=D, tokens=N, numel=tensors(fwd_args)[0].numel())
    graphs0 = counters["stats"]["unique_graphs"]
    try:
        for name, f in fns.items():
            def fwd(f: Callable = f) -> object:
                with torch.no_grad():
                    return f(*fwd_args)

            def fwd_bwd(f: Callable = f) -> object:
                out = f(*bwd_args)
                return torch.autograd.grad(out if isinstance(out, tuple) else (out,), leaves, grads)

            for key, fn in ((f"{name}_fwd", fwd), (f"{name}_fwd_bwd", fwd_bwd)):
                for _ in range(3):  # warm-up: compiles (inference graph, training graph, backward) at this shape
                    fn()
                row[key] = per_call_ms(fn, a.reps, a.min_calls, a.min_ms)
    except Exception as e:  # noqa: BLE001 - out of memory, a compile failure, dynamo's recompile limit: an error row
        row["error"] = str(e).splitlines()[0][:200]
    row["graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs0  # > 0 past the first size: recompiles
    torch.cuda.empty_cache()
    return row


def crossover(rows: list[dict], op: str, direction: str) -> int | None:
    """Smallest numel from which compiled beats eager at every larger measured size of op (None: not at the top)."""
    pts = sorted((r["numel"], r[f"compiled_{direction}"] < r[f"eager_{direction}"])
                 for r in rows if r["op"] == op and "error" not in r)
    best = None
    for numel, compiled_wins in reversed(pts):
        if not compiled_wins:
            break
        best = numel
    return best


def gpu_short_name() -> str:
    match = re.search(r"\b([A-Z]+\d+)", torch.cuda.get_device_name())
    return match.group(1).lower() if match else "gpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON file (a bare name goes to benchmarks/results/)")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--widths", type=int, nargs="+", default=[192, 1920])
    ap.add_argument("--tokens", type=int, nargs="+", default=[128 << i for i in range(8)])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--min-calls", type=int, default=30)
    ap.add_argument("--min-ms", type=float, default=50.0)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_fused_ops.py: needs a CUDA device (the ops compile only there); none found", file=sys.stderr)
        sys.exit(2)
    if any(D % HEAD_DIM for D in a.widths) or any(N % T_FOLD for N in a.tokens):
        ap.error(f"--widths must be multiples of {HEAD_DIM} and --tokens multiples of {T_FOLD}")
    out = a.out or f"fused_ops_{gpu_short_name()}.json"
    if not os.path.dirname(out):
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", out)
    # a silent fall-back to eager past dynamo's recompile limit would be timed as "compiled": fail instead
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    rows: list[dict] = []
    head = dict(environment(), benchmark="fused ops: eager vs compiled by size (issue 5)", batch=B,
                head_dim=HEAD_DIM, fold_frames=T_FOLD, dtype="bfloat16", reps=a.reps, min_calls=a.min_calls,
                min_ms=a.min_ms, fused_min_numel=fused.FUSED_MIN_NUMEL)
    for op in a.ops:
        for D in a.widths:
            for N in a.tokens:
                rows.append(measure(op, D, N, a))
                print(rows[-1], flush=True)
        write_json(out, dict(head, rows=rows, partial=True))
    cross = {op: {d: crossover(rows, op, d) for d in ("fwd", "fwd_bwd")} for op in a.ops}
    write_json(out, dict(head, rows=rows, crossover_numel=cross))
    print(f"\n{'op':<15} {'D':>5} {'N':>6} {'numel':>10} {'eager fwd':>10} {'comp fwd':>9} {'eager f+b':>10} "
          f"{'comp f+b':>9}  faster (fwd, fwd+bwd)   [us per call]")
    for r in rows:
        lead = f"{r['op']:<15} {r['width']:>5} {r['tokens']:>6} {r['numel']:>10}"
        if "error" in r:
            print(f"{lead} error: {r['error'][:70]}")
            continue
        us = " ".join(f"{1e3 * r[k]:>{10 if k.startswith('eager') else 9}.1f}" for k in KEYS)
        win = [("compiled" if r[f"compiled_{d}"] < r[f"eager_{d}"] else "eager") for d in ("fwd", "fwd_bwd")]
        print(f"{lead} {us}  {win[0]}, {win[1]}")
    print("\ncrossover numel (compiled faster from here up):")
    for op, c in cross.items():
        print(f"  {op:<15} fwd {c['fwd']}  fwd+bwd {c['fwd_bwd']}")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
