"""Issue "GPU speed": host time per call of the Triton ops of the MM-DiM mixer (SSD scan, causal conv, gated norm).

At short sequences the MM-DiM layer is host-bound (docs/performance.md): what a call costs is the Python and
dispatch work that issues its kernels. Each op runs forward+backward at a small shape, where the GPU finishes
before the host issues the next call, through its two paths: "eager" (an autograd.Function, what eager calls
use) and "custom_op" (the torch.library ops that torch.compile sees, forced for eager calls too, as every call
was before m4v.ops.eager). Wall microseconds per call over --calls calls, median of --rep.

    PYTHONPATH=. python benchmarks/bench_op_dispatch.py --out benchmarks/results/op_dispatch.json
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/bench_op_dispatch.py --device cpu --dtype float32 \
        --tokens 32 --heads 2 --headdim 16 --d-state 16 --calls 2 --rep 1      (a smoke run: interpreted kernels)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, write_json  # noqa: E402

from m4v.ops import eager  # noqa: E402


def make_calls(
    device: torch.device, dtype: torch.dtype, tokens: int, h: int = 30, p: int = 64, n: int = 64
) -> dict[str, Callable[[], None]]:
    """One forward+backward per op; default the MM-DiM mixer's head layout (30 heads of 64, a group per head,
    d_state 64)."""
    from m4v.ops.conv_triton import causal_conv1d_triton
    from m4v.ops.norm_triton import gated_rms_norm
    from m4v.ops.ssd_triton import ssd_triton

    g = h
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
        t = (torch.randn(*shape, generator=gen) * scale).to(device, dtype if len(shape) > 1 else torch.float32)
        return t.requires_grad_(grad)

    x, z = rnd(1, tokens, h, p), rnd(1, tokens, h, p)
    dt, B, C = rnd(1, tokens, h, scale=0.5), rnd(1, tokens, g, n), rnd(1, tokens, g, n)
    A, D, bias = -torch.rand(h, device=device) - 0.5, rnd(h), rnd(h, scale=0.1)
    gy = torch.randn(1, tokens, h, p, generator=gen).to(device, dtype)
    xc, wc, bc = rnd(1, tokens, h * p + 2 * g * n), rnd(h * p + 2 * g * n, 4), rnd(h * p + 2 * g * n)
    gc = torch.randn(1, tokens, h * p + 2 * g * n, generator=gen).to(device, dtype)
    yn, zn, wn = rnd(1, tokens, h * p), rnd(1, tokens, h * p), rnd(h * p)
    gn = torch.randn(1, tokens, h * p, generator=gen).to(device, dtype)

    def ssd_call() -> None:
        ssd_triton(x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True, chunk_size=256).backward(gy)

    def conv_call() -> None:
        causal_conv1d_triton(xc, wc, bc, "silu").backward(gc)

    def norm_call() -> None:
        gated_rms_norm(yn, zn, wn, p).backward(gn)

    return {"ssd": ssd_call, "causal_conv1d": conv_call, "gated_rms_norm": norm_call}


def per_call_us(fn: Callable[[], None], calls: int, rep: int, sync: Callable[[], None]) -> float:
    """Median over ``rep`` of the wall microseconds per call of ``calls`` back-to-back calls (one sync at the end)."""
    fn()
    sync()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--heads", type=int, default=30, help="SSM heads (and groups); 30 of 64 at width 1920")
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--d-state", type=int, default=64)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rep", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    calls = make_calls(device, getattr(torch, args.dtype), args.tokens, args.heads, args.headdim, args.d_state)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for name, fn in calls.items():
        eager_us = per_call_us(fn, args.calls, args.rep, sync)
        original = eager.choose
        eager.choose = lambda op, plain: op  # type: ignore[assignment]  # every call through the custom ops
        try:
            op_us = per_call_us(fn, args.calls, args.rep, sync)
        finally:
            eager.choose = original  # type: ignore[assignment]
        rows.append({"op": name, "tokens": args.tokens, "eager_us": eager_us, "custom_op_us": op_us})
    shape = {"heads": args.heads, "headdim": args.headdim, "d_state": args.d_state}
    result = {**environment(), "benchmark": "op_dispatch", "dtype": args.dtype, "calls": args.calls, **shape}
    result["rows"] = rows
    write_json(args.out, result)
    print(f"{'op (fwd+bwd)':<16} {'eager us':>10} {'custom op us':>13} {'saved':>8}")
    for r in rows:
        saved = r["custom_op_us"] - r["eager_us"]
        print(f"{r['op']:<16} {r['eager_us']:>10.1f} {r['custom_op_us']:>13.1f} {saved:>8.1f}")


if __name__ == "__main__":
    main()
