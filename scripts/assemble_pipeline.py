"""Assemble an M4VPipeline folder (model_index.json, transformer/, vae/, scheduler/) from trained parts.

The text encoder is referenced by name (MiniLM ships with the package). ``--half`` stores the weights in
float16 (the loaders upcast them to the model's float32 parameters), which halves the size of a shipped model.

    python scripts/assemble_pipeline.py --transformer runs/train_moving_shapes/final/transformer_ema \
        --vae runs/vae_moving_shapes/final/vae -o m4v/assets/default --size 128 --frames 17 --half
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import load_file, save_file


def halve_folder(folder: str) -> None:
    """Rewrite every float32 tensor of every safetensors file under ``folder`` as float16."""
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".safetensors"):
                path = os.path.join(root, name)
                sd = load_file(path)
                sd = {k: v.half() if v.dtype == torch.float32 else v for k, v in sd.items()}
                save_file(sd, path, metadata={"format": "pt"})


def drop_source_paths(folder: str) -> None:
    """Remove ``_name_or_path`` (the build machine's folder the parts were loaded from) from every config.json."""
    for root, _, files in os.walk(folder):
        if "config.json" in files:
            path = os.path.join(root, "config.json")
            with open(path) as f:
                cfg = json.load(f)
            if cfg.pop("_name_or_path", None) is not None:
                with open(path, "w") as f:
                    json.dump(cfg, f, indent=2, sort_keys=True)
                    f.write("\n")


def main(argv: list[str] | None = None) -> None:
    from m4v.models import M4VTransformer
    from m4v.models.text_encoders import load_text_encoder
    from m4v.models.vae import VideoVAE
    from m4v.pipelines import M4VPipeline
    from m4v.schedulers import PyramidFlowMatchScheduler

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--halve-only", metavar="DIR", help="only rewrite DIR's safetensors as float16, in place")
    p.add_argument("--transformer")
    p.add_argument("--vae")
    p.add_argument("-o", "--output")
    p.add_argument("--size", type=int, default=128, help="default height and width")
    p.add_argument("--frames", type=int, default=17, help="default frame count")
    p.add_argument("--guidance", type=float, nargs=2, default=[7.0, 5.0], metavar=("FIRST", "LATER"),
                   help="default text guidance of the first and of later frames (default PyramidFlow's 7 5)")
    p.add_argument("--half", action="store_true", help="store weights as float16")
    a = p.parse_args(argv)
    if a.halve_only:
        halve_folder(a.halve_only)
        return
    if not (a.transformer and a.vae and a.output):
        p.error("--transformer, --vae and -o are required")
    transformer = M4VTransformer.from_pretrained(a.transformer, local_files_only=True)
    pipe = M4VPipeline(transformer, VideoVAE.from_pretrained(a.vae), load_text_encoder("minilm"),
                       PyramidFlowMatchScheduler())
    pipe.default_size = (a.size, a.size)
    pipe.default_frames = a.frames
    pipe.default_guidance = tuple(a.guidance)
    pipe.save_pretrained(a.output)
    drop_source_paths(a.output)
    if a.half:
        halve_folder(a.output)
    print(a.output)


if __name__ == "__main__":
    main()
