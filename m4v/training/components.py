"""Building the frozen and trainable pieces named by a training config: transformer, VAE, text encoder."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from m4v.training.config import ModelConfig
from m4v.training.seeding import derive_seed

logger = logging.getLogger(__name__)


def build_transformer(cfg: ModelConfig, seed: int) -> Any:
    """A named config with overrides (initialised from ``seed``, identical on every rank) or a pretrained folder."""
    from m4v.models import M4VTransformer, named_config

    if cfg.pretrained:
        if not os.path.isfile(os.path.join(cfg.pretrained, "config.json")):
            raise ValueError(f"model.pretrained: {cfg.pretrained} is not a save_pretrained folder (no config.json).")
        model = M4VTransformer.from_pretrained(cfg.pretrained, local_files_only=True)
        if cfg.overrides:
            logger.warning("model.overrides are ignored when model.pretrained is set.")
        return model.float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model-init") % (1 << 63))
        return M4VTransformer(**named_config(cfg.config, **cfg.overrides))


def load_vae(spec: str, seed: int = 0) -> Any:
    """A named VAE config (random weights: smoke runs only) or a ``VideoVAE.save_pretrained`` folder."""
    from m4v.models.vae import VAE_CONFIGS, VideoVAE, build_video_vae

    if spec in VAE_CONFIGS:
        logger.warning("vae: %r is a randomly initialised VAE (for tests and smoke runs, not real training).", spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "vae-init") % (1 << 63))
            return build_video_vae(spec)
    if not os.path.isdir(spec):
        raise ValueError(f"vae: {spec!r} is neither a named VAE config ({', '.join(VAE_CONFIGS)}) nor a folder.")
    return VideoVAE.from_pretrained(spec)
