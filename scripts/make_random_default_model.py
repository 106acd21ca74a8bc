"""Write a random-weight pipeline of the tiny config (seeded): what m4v/assets/default held before the trained
model (docs/model_card.md) replaced it; still handy as a small, fast model for smoke runs.

Usage: python scripts/make_random_default_model.py OUT_DIR
"""

import sys

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
    main(*sys.argv[1:])
