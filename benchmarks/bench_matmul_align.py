"""cuBLAS bf16 time of Mamba2's in_proj against the alignment of its output width (issue 5, docs/performance.md).

At width 1920 (30 heads x 64, 30 groups, d_state 64) in_proj has 2*1920 + 2*1920 + 30 = 7710 outputs: rows of
15,420 bytes, not 16-byte aligned. This times ``x @ W.T`` (forward), ``dY @ W`` (input gradient) and ``dY.T @ x``
(weight gradient) at 7710 outputs against 7712 (what ``m4v.layers.mamba2.aligned_linear`` pads it to), 7680 and
7744, for the token counts of a generation step (batch 2 doubles them) and prints TFLOP/s.

    PYTHONPATH=. python benchmarks/bench_matmul_align.py --out benchmarks/results/matmul_align_h100.json
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import bench, environment, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[3968, 7936, 15488, 30976])
    ap.add_argument("--widths", type=int, nargs="+", default=[7710, 7712, 7680, 7744])
    ap.add_argument("--dim", type=int, default=1920)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    for T in args.tokens:
        x = torch.randn(T, args.dim, device=dev, dtype=dt)
        for N in args.widths:
            w = torch.randn(N, args.dim, device=dev, dtype=dt) * 0.02
            dy = torch.randn(T, N, device=dev, dtype=dt)
            fwd = bench(lambda: x @ w.t(), warmup=10, rep=50)
            dx = bench(lambda: dy @ w, warmup=10, rep=50)
            dw = bench(lambda: dy.t() @ x, warmup=10, rep=50)
            flop = 2 * T * args.dim * N
            rows.append(dict(tokens=T, width=N, fwd_ms=fwd, dx_ms=dx, dw_ms=dw,
                             fwd_tflops=flop / fwd / 1e9, bwd_tflops=2 * flop / (dx + dw) / 1e9))
    write_json(args.out, dict(environment(), benchmark="in_proj matmul vs output alignment", dim=args.dim, rows=rows))
    print(f"{'tokens':>7} {'width':>6} {'fwd ms':>8} {'dx ms':>8} {'dw ms':>8} {'fwd TF/s':>9} {'bwd TF/s':>9}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['width']:>6} {r['fwd_ms']:>8.3f} {r['dx_ms']:>8.3f} {r['dw_ms']:>8.3f} "
              f"{r['fwd_tflops']:>9.0f} {r['bwd_tflops']:>9.0f}")


if __name__ == "__main__":
    main()
