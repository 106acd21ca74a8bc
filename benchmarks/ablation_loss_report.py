"""Table 3 by training loss (docs/results.md): each ablation's flow loss against the control's, step by step.

Variants trained side by side by ``scripts/train_default_model.sh`` with one seed share their data order, noise
and pyramid stage at every step, so the flow losses they log at the same step are paired: the relative difference
``loss_variant / loss_control - 1`` of a step removes most of the batch-to-batch noise. This prints, for each
variant, the mean of that difference and its standard error over the logged steps from ``--from-step`` on, for
video steps by latent frame (frame 0 has no history, so a temporal module can only matter from frame 1) and for
image steps, and writes them as JSON.

    python benchmarks/ablation_loss_report.py benchmarks/results/moving_shapes_h200_patch1/ablations_c2 \\
        --control full_temp --from-step 1000 --out benchmarks/results/moving_shapes_h200_patch1/ablations_c2/loss.json
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import statistics
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, write_json  # noqa: E402


def read_metrics(path: str) -> dict[int, dict[str, str]]:
    """``metrics.csv`` of ``m4v train`` as {step: row}."""
    with open(path) as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


def paired(control: dict[int, dict[str, str]], variant: dict[int, dict[str, str]], keep) -> dict[str, float]:
    """Mean and standard error of ``variant / control - 1`` of the flow loss over the shared steps ``keep`` accepts."""
    diffs = []
    for step, row in control.items():
        other = variant.get(step)
        if other is None or not keep(step, row):
            continue
        if (other["kind"], other["frame"], other["pyramid_stage"]) != (row["kind"], row["frame"], row["pyramid_stage"]):
            raise ValueError(f"step {step}: the runs did not see the same kind of batch (not trained with one seed?)")
        diffs.append(float(other["flow_loss"]) / float(row["flow_loss"]) - 1.0)
    if len(diffs) < 2:
        return {"steps": len(diffs)}
    return {"steps": len(diffs), "mean": statistics.fmean(diffs), "se": statistics.stdev(diffs) / math.sqrt(len(diffs))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="folder of metrics_VARIANT.csv files")
    p.add_argument("--control", default="full_temp")
    p.add_argument("--from-step", type=int, default=0, help="first step counted (skip the re-adaptation)")
    p.add_argument("--out", help="JSON output")
    args = p.parse_args(argv)
    files = {os.path.basename(f)[len("metrics_"):-len(".csv")]: f
             for f in sorted(glob.glob(os.path.join(args.folder, "metrics_*.csv")))}
    if args.control not in files:
        print(f"error: no metrics_{args.control}.csv in {args.folder}", file=sys.stderr)
        return 2
    control = read_metrics(files.pop(args.control))
    frames = sorted({r["frame"] for r in control.values() if r["kind"] == "video"}, key=int)
    groups = {"video": lambda s, r: r["kind"] == "video", "image": lambda s, r: r["kind"] == "image"}
    groups.update({f"video frame {fr}": (lambda fr: lambda s, r: r["kind"] == "video" and r["frame"] == fr)(fr)
                   for fr in frames})
    result = {}
    for name, path in files.items():
        variant = read_metrics(path)
        result[name] = {g: paired(control, variant, lambda s, r, k=keep: s >= args.from_step and k(s, r))
                        for g, keep in groups.items()}
    print(f"flow loss against {args.control}, logged steps >= {args.from_step}: "
          "mean relative difference +- s.e. (steps)")
    print("| variant | " + " | ".join(groups) + " |")
    print("| --- |" + " --- |" * len(groups))
    for name, res in result.items():
        cells = [f"{100 * r['mean']:+.2f}% +- {100 * r['se']:.2f} ({r['steps']})" if "mean" in r else "-"
                 for r in res.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.out:
        write_json(args.out, {**environment(), "benchmark": "Table 3 ablations by paired flow loss (issue 6)",
                              "control": args.control, "from_step": args.from_step, "variants": result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
