"""Paper Tables 3-4 on Moving Shapes (docs/results.md): the five variants trained side by side by
``scripts/train_default_model.sh train`` and evaluated on the held-out split.

Reads the run's ``eval_VARIANT.json`` (``m4v eval shapes --out``) and ``metrics_VARIANT.csv`` files, adds for each
variant its parameter count and mixer FLOPs (m4v.eval.flops, last autoregressive step, final stage, at the
model's 128x128x17) and, with ``--cpu-timing``, the CPU seconds per transformer call of a generation with random
weights of that variant (the cost does not depend on the weights). Writes JSON and prints the Markdown table.

    python benchmarks/moving_shapes_table.py benchmarks/results/moving_shapes_h100 --train-minutes 10.5 \
        --cpu-timing --out benchmarks/results/moving_shapes_h100/table.json

A run continued over several GPU sessions (``FROM=DIR`` in the script) names the folders of its earlier legs with
``--earlier`` (their metrics files add their steps; a leg without a variant's metrics file, e.g. one that trained
only full_temp, adds none) and gives the minutes of all legs together, ``--variant-minutes NAME=MIN`` where a
variant trained for other minutes; ``--set`` repeats the script's ``EXTRA`` overrides (e.g. ``--set patch_size=1``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, write_json  # noqa: E402

from m4v.eval.flops import count_parameters, last_step_frame_grids, mixer_flops, resolved_config  # noqa: E402
from m4v.generate_cli import default_model_dir  # noqa: E402
from m4v.pipelines import M4VPipeline  # noqa: E402
from m4v.training.config import load_config  # noqa: E402

VARIANTS = {  # name: transformer overrides on top of configs/train_moving_shapes.yaml (as in the script)
    "full_temp": {},
    "full_attn": {"layout": "full_attn"},
    "no_recomposition": {"text_recomposition": False},
    "no_registers": {"registers": False},
    "no_temporal": {"layout": "full"},
}
ATTRIBUTES = ("colour", "shape", "motion", "size", "count", "background")


def parse_value(text: str) -> object:
    """A ``--set`` value as YAML would read it (int, float, bool or string)."""
    import yaml

    return yaml.safe_load(text)


def last_step(run: str, name: str, missing_ok: bool = False) -> int:
    """Steps a variant trained in one leg: the last step its metrics file logged, plus one (0 for an earlier leg
    that did not train it, ``missing_ok``)."""
    path = os.path.join(run, f"metrics_{name}.csv")
    if missing_ok and not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(list(csv.DictReader(f))[-1]["step"]) + 1


def variant_config(base: dict, overrides: dict) -> dict:
    """The full transformer config of a variant: the training config's model plus the variant's overrides."""
    return resolved_config(base["config"], **{**base["overrides"], **overrides})


def cpu_seconds_per_call(shipped: M4VPipeline, cfg: dict, steps: int) -> float:
    """Seconds per transformer call of one 128x128x17 generation (CFG batch of 2), random weights, CPU; the VAE,
    text encoder and scheduler are the shipped pipeline's."""
    from m4v.models import M4VTransformer

    torch.manual_seed(0)
    pipe = M4VPipeline(M4VTransformer(**cfg).eval(), shipped.vae, shipped.text_encoder, shipped.scheduler)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(time.perf_counter()))
    kwargs = dict(num_inference_steps=steps, video_num_inference_steps=max(1, steps // 2),
                  generator=torch.Generator().manual_seed(0))
    pipe("a big red circle moving to the right on a black background", **kwargs)  # warm-up
    calls.clear()
    t0 = time.perf_counter()
    pipe("a big red circle moving to the right on a black background", **kwargs)
    handle.remove()
    return (calls[-1] - t0) / len(calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="folder with eval_VARIANT.json and metrics_VARIANT.csv")
    ap.add_argument("--config", default="configs/train_moving_shapes.yaml")
    ap.add_argument("--train-minutes", type=float, required=True,
                    help="the --time-limit each variant trained for (all legs together)")
    ap.add_argument("--earlier", action="append", default=[], help="folder of an earlier leg of the same run")
    ap.add_argument("--variant-minutes", action="append", default=[], metavar="NAME=MIN",
                    help="minutes of one variant where they differ from --train-minutes (a leg it did not train)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="transformer override of every variant (the script's EXTRA)")
    ap.add_argument("--text-len", type=int, default=13,
                    help="text tokens in the mixer FLOPs (held-out prompts: 12.8 MiniLM tokens on average)")
    ap.add_argument("--cpu-timing", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    base = load_config(args.config).model
    base = {"config": base.config, "overrides": dict(base.overrides)}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set takes KEY=VALUE, got {item!r}")
        base["overrides"][key] = parse_value(value)
    minutes: dict[str, float] = {}
    for item in args.variant_minutes:
        name, _, value = item.partition("=")
        try:
            minutes[name] = float(value)
        except ValueError:
            minutes[name] = 0.0
        if name not in VARIANTS or not minutes[name] > 0:  # also refuses nan
            ap.error(f"--variant-minutes takes NAME=MIN with NAME one of {', '.join(VARIANTS)}, got {item!r}")
    shipped = M4VPipeline.from_pretrained(default_model_dir()) if args.cpu_timing else None
    rows = []
    for name, overrides in VARIANTS.items():
        path = os.path.join(args.run, f"eval_{name}.json")
        if not os.path.exists(path):
            continue
        report = json.load(open(path))
        cfg = variant_config(base, overrides)
        grids = last_step_frame_grids(128, 128, 17, patch=cfg["patch_size"])
        flops = mixer_flops(cfg, grids, args.text_len)
        steps = sum(last_step(run, name, missing_ok=True) for run in args.earlier) + last_step(args.run, name)
        row = {
            "variant": name,
            "accuracy": {k: report["accuracy"][k] for k in ATTRIBUTES},
            "temporal_flickering": report["mean_temporal_flickering"],
            "videos": report["num_videos"],
            "params_m": count_parameters(cfg) / 1e6,
            "mixer_gflops": flops.total / 1e9,
            "train_steps": steps,
            "train_minutes": minutes.get(name, args.train_minutes),
            "train_s_per_step_side_by_side": 60.0 * minutes.get(name, args.train_minutes) / steps,
        }
        if args.cpu_timing:
            row["cpu_s_per_transformer_call"] = cpu_seconds_per_call(shipped, cfg, 20)
        rows.append(row)
    result = {**environment(), "run": args.run, "earlier": args.earlier, "overrides": args.set,
              "train_minutes": args.train_minutes, "variant_minutes": minutes, "text_len": args.text_len, "rows": rows}
    if args.out:
        write_json(args.out, result)
    head = ("| variant | colour | shape | motion | size | count | flickering | params | mixer GFLOPs | steps "
            "| s/step (side by side) |")
    cpu = " CPU s/call |" if args.cpu_timing else ""
    print(head + cpu)
    print("|" + " --- |" * (head.count("|") - 1 + (1 if cpu else 0)))
    for r in rows:
        a = r["accuracy"]
        cells = [r["variant"], *(f"{100 * a[k]:.1f}%" for k in ("colour", "shape", "motion", "size", "count")),
                 f"{100 * r['temporal_flickering']:.2f}%", f"{r['params_m']:.1f}M", f"{r['mixer_gflops']:.2f}",
                 str(r["train_steps"]), f"{r['train_s_per_step_side_by_side']:.3f}"]
        if args.cpu_timing:
            cells.append(f"{r['cpu_s_per_transformer_call']:.3f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
