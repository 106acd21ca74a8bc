"""Table 3 ablations from one trained M4V (paper C.2: every variant from the same initialisation, equal steps).

The paper's fast evaluation protocol starts each architectural variant from the same pretrained weights and
fine-tunes all of them for the same number of steps, so that only the ablated module differs. This writes,
from a trained ``full_temp`` transformer, one ``save_pretrained`` folder per variant, ready for
``scripts/train_default_model.sh`` (``FROM=OUT``):

    full_temp         the weights as they are (the control)
    no_recomposition  text_recomposition=false (text once, before the video): the same parameters
    no_registers      registers=false: the per-frame register tokens dropped
    no_temporal       layout full (MM-DiM without the temporal branch): the temporal branches dropped

Every other tensor is copied unchanged; a variant that would need a tensor the source lacks is refused.

    python scripts/make_ablation_seeds.py --transformer m4v/assets/default/transformer -o seeds
"""

from __future__ import annotations

import argparse
import os
import sys

ABLATIONS: dict[str, dict[str, object]] = {
    "full_temp": {},
    "no_recomposition": {"text_recomposition": False},
    "no_registers": {"registers": False},
    "no_temporal": {"layout": "full"},
}


def derive(source, overrides: dict[str, object]):
    """A model with ``source``'s config changed by ``overrides`` and every tensor it shares with ``source``."""
    from m4v.models import M4VTransformer

    config = {k: v for k, v in source.config.items() if not k.startswith("_")}
    config.update(overrides)
    target = M4VTransformer(**config)
    src = source.state_dict()
    missing = [k for k in target.state_dict() if k not in src]
    if missing:
        raise ValueError(f"the source lacks {len(missing)} tensors of this variant (first: {missing[0]}).")
    target.load_state_dict({k: src[k] for k in target.state_dict()}, strict=True)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transformer", required=True, help="save_pretrained folder of a trained full_temp M4VTransformer")
    p.add_argument("-o", "--output", required=True, help="folder for transformer_VARIANT/ (one per variant)")
    p.add_argument("--variants", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.transformer, "config.json")):
        print(f"error: {args.transformer} is not a save_pretrained folder (no config.json).", file=sys.stderr)
        return 2
    from m4v.models import M4VTransformer

    source = M4VTransformer.from_pretrained(args.transformer, local_files_only=True)
    if source.config.layout != "full_temp":
        layout = source.config.layout
        print(f"error: the source's layout is {layout}; the ablations start from full_temp.", file=sys.stderr)
        return 2
    for name in args.variants:
        out = os.path.join(args.output, f"transformer_{name}")
        model = derive(source, ABLATIONS[name])
        model.save_pretrained(out, safe_serialization=True)
        n = sum(t.numel() for t in model.parameters())
        print(f"{name}: {n / 1e6:.2f}M parameters -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
