"""Where a shape-accuracy gap lies (issue 6, docs/results.md): fill ratios of one colour/shape pair by background.

``m4v eval shapes`` reads an object's shape from the median over frames of its fill ratio (area / bounding box;
circle pi/4, square 1, triangle 1/2) and skewness, by the nearest prototype (``m4v.eval.shapes``). Between two
prototypes of equal skewness the decision boundary is the midpoint of their fill ratios (0.893 between circle
and square). This prints, for each eval JSON, the median fill ratio of the pair's videos per background and
motion (moving / still) with the share read as the right shape, and how far the medians sit from the boundary.

    python benchmarks/shape_fill_report.py --pair "orange square" \\
        shipped=benchmarks/results/moving_shapes_h200_patch1/leg4/eval_full_temp.json \\
        attention=benchmarks/results/moving_shapes_h200_patch1/leg4/eval_full_attn.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from m4v.eval.shapes import SHAPE_PROTOTYPES


def boundary(shape: str) -> tuple[str, float]:
    """The prototype nearest to ``shape`` in fill ratio among those of equal skewness, and the midpoint of the two."""
    if shape not in SHAPE_PROTOTYPES:
        raise ValueError(f"--pair: unknown shape {shape!r} (one of {', '.join(SHAPE_PROTOTYPES)})")
    fill, skew = SHAPE_PROTOTYPES[shape]
    others = [(abs(f - fill), s) for s, (f, k) in SHAPE_PROTOTYPES.items() if s != shape and k == skew]
    if not others:
        raise ValueError(f"--pair: no other shape shares the skewness of {shape!r}")
    _, other = min(others)
    return other, (fill + SHAPE_PROTOTYPES[other][0]) / 2


def rows(path: str, colour: str, shape: str) -> list[dict]:
    """Per (background, moving/still): videos, median fill ratio, share read as ``shape``."""
    data = json.load(open(path))
    groups: dict[tuple[str, str], list[dict]] = {}
    for prompt in data["per_prompt"]:
        objs = prompt["meta"]["objects"]
        if len(objs) != 1 or objs[0]["colour"] != colour or objs[0]["shape"] != shape:
            continue
        motion = "still" if objs[0]["motion"] == "still" else "moving"
        for video in prompt["videos"]:
            if video["objects"]:
                groups.setdefault((prompt["meta"]["background"], motion), []).append(video["objects"][0])
    return [
        dict(background=bg, motion=motion, videos=len(objs),
             median_fill=statistics.median(o["fill_ratio"] for o in objs),
             right=sum(o["shape"] == shape for o in objs) / len(objs))
        for (bg, motion), objs in sorted(groups.items())
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("evals", nargs="+", metavar="LABEL=EVAL_JSON")
    ap.add_argument("--pair", default="orange square", help='"colour shape" of the held-out pair to look at')
    args = ap.parse_args()
    try:
        if len(args.pair.split()) != 2:
            raise ValueError('--pair must be "colour shape", e.g. "orange square"')
        colour, shape = args.pair.split()
        other, edge = boundary(shape)
        runs = [tuple(e.split("=", 1)) for e in args.evals]
        if any(len(r) != 2 for r in runs):
            raise ValueError("each eval must be given as LABEL=EVAL_JSON")
        tables = [(label, rows(path, colour, shape)) for label, path in runs]
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.pair}: {shape} vs {other} boundary at fill ratio {edge:.3f}")
    print(f"{'model':24s} {'background':10s} {'motion':7s} {'videos':>6s} {'median fill':>11s} {'- boundary':>10s} "
          f"{'read ' + shape:>12s}")
    for label, table in tables:
        for r in table:
            print(f"{label:24s} {r['background']:10s} {r['motion']:7s} {r['videos']:6d} {r['median_fill']:11.3f} "
                  f"{r['median_fill'] - edge:+10.3f} {100 * r['right']:11.1f}%")


if __name__ == "__main__":
    main()
