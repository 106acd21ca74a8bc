"""The tiny M4V model overfits a handful of Moving Shapes clips: the flow-matching loss falls by 10x."""

from __future__ import annotations

import torch

from m4v.training.components import load_vae
from m4v.training.shards import prepare
from m4v.training.testing import tiny_config
from m4v.training.text import HashTextEncoder
from m4v.training.trainer import Trainer


def test_tiny_model_overfits_four_clips(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = {"source": "moving_shapes", "moving_shapes": {"num_samples": 4, "max_objects": 1}}
        stage = dict(steps=500, height=64, width=64, num_frames=9, image_ratio=0.0, batch_size=4)
        cfg = tiny_config(
            tmp_path, data=data, stages=[stage], objective={"text_dropout": 0.0}, ema={"enabled": False},
            optim={"lr": 3e-3, "warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.02},
            logging={"every": 100, "progress": False, "tensorboard": False},
        )
        # latents of the 4 clips (2 latent frames each) computed once with the tiny VAE
        prepare("moving_shapes", cfg.data, tmp_path / "latents", [(64, 64, 9)], load_vae("tiny"),
                HashTextEncoder(dim=384), {}, dtype="float32", progress=False)
        cfg.data.source = str(tmp_path / "latents")
        trainer = Trainer(cfg)
        held = list(range(24))  # a fixed evaluation set: 24 batches with their own noise draws, all 3 stages
        assert {trainer.planner.plan(m).pyramid_stage for m in held} == {0, 1, 2}
        before = trainer.evaluate(held)
        history = trainer.train()
        after = trainer.evaluate(held)
        assert before / after > 10, (before, after)
        first, last = history[:20], history[-20:]
        assert sum(r["flow_loss"] for r in last) < 0.25 * sum(r["flow_loss"] for r in first)
    finally:
        torch.set_num_threads(threads)
