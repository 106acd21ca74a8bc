"""Write a random-weight pipeline of the tiny config (seeded): what m4v/assets/default held before the trained
model (docs/model_card.md) replaced it; still handy as a small, fast model for smoke runs.

Usage: python scripts/make_random_default_model.py OUT_DIR
"""

import argparse

import torch

from m4v.models import M4VTransformer, named_config
from m4v.models.text_encoders import load_text_encoder
from m4v.models.vae import build_video_vae
from m4v.pipelines import M4VPipeline
from m4v.schedulers import PyramidFlowMatchScheduler


def main(out: str = "runs/tiny_random") -> None:
    torch.manual_seed(0)
    pipe = M4VPipeline(
        M4VTransformer(**named_config("tiny")), build_video_vae("tiny"), load_text_encoder("minilm"),
        PyramidFlowMatchScheduler(),
    )
    pipe.save_pretrained(out)
    print(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="runs/tiny_random", help="output folder (default runs/tiny_random)")
    main(ap.parse_args().out)
