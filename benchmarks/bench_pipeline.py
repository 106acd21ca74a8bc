"""Wall clock of ``M4VPipeline`` generations on one device, CUDA graphs off and on (issue 5; m4v.models.cuda_graphs).

Loads a model directory (default: the shipped Moving Shapes model), generates the README prompt with the model's
defaults (``--batch`` prompts at once), ``--runs`` times per setting after one warm-up generation, and reports
the median seconds (latents only: no VAE decode, no video file) and how far the latents of the two settings differ.

    python benchmarks/bench_pipeline.py --device cuda --out benchmarks/results/pipeline_graphs.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, write_json  # noqa: E402

from m4v.pipelines import M4VPipeline  # noqa: E402

PROMPT = "a red circle moving to the right on a black background"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.model is None:
        from m4v.generate_cli import default_model_dir

        args.model = default_model_dir()
    pipe = M4VPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype)).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for batch in args.batch:
        latents = {}
        for graphs in (False, True) if args.device.startswith("cuda") else (False,):
            times = []
            for run in range(args.runs + 1):  # the first run warms up (kernels, compiled ops, cuDNN plans)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = pipe([PROMPT] * batch, generator=torch.Generator().manual_seed(0), output_type="latent",
                           cuda_graphs=graphs)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if run:
                    times.append(time.perf_counter() - t0)
            latents[graphs] = out.latents.float()
            rows.append(dict(batch=batch, cuda_graphs=graphs, median_s=statistics.median(times), runs_s=times))
            med = statistics.median(times)
            print(f"batch {batch:>3} graphs {'on' if graphs else 'off':<3}: {med:.3f} s", flush=True)
        if True in latents:
            diff = (latents[True] - latents[False]).norm() / latents[False].norm()
            rows[-1]["latents_rel_diff_vs_off"] = diff.item()
            print(f"batch {batch:>3}: speed-up {rows[-2]['median_s'] / rows[-1]['median_s']:.2f}x, latents rel. diff "
                  f"{diff.item():.1e}", flush=True)
        write_json(args.out, dict(environment(), benchmark="pipeline wall clock, CUDA graphs", model=args.model,
                                  dtype=args.dtype, rows=rows))


if __name__ == "__main__":
    main()
