"""Kernel breakdown (GPU time per kernel) of one compiled fwd+bwd of the MM-DiM + temporal branch and the attention
mixer layers of ``bench_layers.py`` at width 1920 (issue 5 (b), docs/performance.md).

    PYTHONPATH=. python benchmarks/profile_layers.py --tokens 3968 15488 --out benchmarks/results/layers_profile.json
    PYTHONPATH=. python benchmarks/profile_layers.py --eager --tokens 15488 --top 30

Each layer also gets its host-side numbers: the wall time of one fwd+bwd (synchronised, median of 20), the time the
Python call takes to return before synchronising (the launch work on the CPU), and the kernel launches per call.
When the launch time is close to the wall time and the kernels' sum is below it, the layer is host-bound: the GPU
waits for launches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_layers import LAYOUTS, AttentionMixer  # noqa: E402
from common import environment, write_json  # noqa: E402

from m4v.layers.rope import frame_positions, rope_cos_sin  # noqa: E402
from m4v.models.blocks import MMDiMBlock, SequenceContext  # noqa: E402


def profile(call, grad: torch.Tensor, reps: int = 5) -> list[tuple[float, int, str]]:  # noqa: ANN001
    """(ms per call, launches per call, kernel name) of every CUDA kernel of call().backward(grad)."""
    for _ in range(reps):
        call().backward(grad)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call().backward(grad)
        torch.cuda.synchronize()
    rows = [
        (e.self_device_time_total / reps / 1e3, e.count // reps, e.key[:90])
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
    ]
    return sorted(rows, reverse=True)


def host_timing(call, grad: torch.Tensor, reps: int = 20) -> dict[str, float]:  # noqa: ANN001
    """Median wall ms of a synchronised call().backward(grad), and median ms until it returns (launch time)."""
    walls, launches = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call().backward(grad)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        launches.append((t1 - t0) * 1e3)
        walls.append((t2 - t0) * 1e3)
    return dict(wall_ms=statistics.median(walls), launch_ms=statistics.median(launches))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[3968, 15488])
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--eager", action="store_true", help="profile the eager layers instead of torch.compile'd ones")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ["M4V_SSD_BACKEND"] = "triton"
    D, H, dev, dt = 1920, 30, torch.device("cuda"), torch.bfloat16
    ssm = dict(d_state=64, expand=1, headdim=64, ngroups=H, chunk_size=256)
    block = MMDiMBlock(D, H, 4 * D, ssm, path=1, temporal_branch=True).to(dev, dt)
    attn = AttentionMixer(D, H).to(dev, dt)
    out = {}
    for n in args.tokens:
        L, sizes = LAYOUTS[n]
        x = torch.randn(1, n, D, device=dev, dtype=dt, requires_grad=True)
        grad = torch.randn_like(x)
        rope = rope_cos_sin(frame_positions(sizes, sizes[-1], L, dev), (16, 24, 24))
        ctx = SequenceContext(torch.ones(1, L, dtype=torch.bool, device=dev), sizes, (16, 24, 24), 10000.0)
        ctx.prepare({1}, attention=False)
        for name, fn in (("mmdim+temporal", lambda: block.mix(x, ctx)),
                         ("attention/cudnn", lambda: attn(x, rope, SDPBackend.CUDNN_ATTENTION))):
            call = fn if args.eager else torch.compile(fn, dynamic=False)  # warmed up by profile()
            rows = profile(call, grad)
            total = sum(r[0] for r in rows)
            host = host_timing(call, grad)
            count = sum(r[1] for r in rows)
            print(f"== {name} {n} tokens: GPU {total:.3f} ms per fwd+bwd ({'eager' if args.eager else 'compiled'}), "
                  f"wall {host['wall_ms']:.3f} ms, launch {host['launch_ms']:.3f} ms, {count} kernels")
            for ms, c, key in rows[: args.top]:
                print(f"  {ms:7.3f} ms x{c:<3d} {key}")
            out[f"{name}/{n}"] = dict(total_ms=total, kernel_launches=count, **host, kernels=rows)
    write_json(args.out, dict(environment(), benchmark="mixer layer kernel profile (issue 5b)", layers=out))


if __name__ == "__main__":
    main()
