"""Building the frozen and trainable pieces named by a training config: transformer, VAE, text encoder."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from m4v.models.loading import config_class
from m4v.training.config import ModelConfig
from m4v.training.seeding import derive_seed

logger = logging.getLogger(__name__)

WAN_CLASS = "M4VWanTransformer"


def load_pretrained(cls: Any, folder: str, option: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder)`` strictly (``m4v.models.loading``), errors naming the config key ``option``."""
    from m4v.models.loading import load_strict

    return load_strict(cls.from_pretrained, cls.__name__, folder, option, **kwargs)


def check_overrides(cls: Any, overrides: dict[str, Any], option: str) -> None:
    """Every key of ``overrides`` must be an argument of ``cls``'s constructor (ValueError naming the first one)."""
    import inspect

    allowed = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "args", "kwargs")]
    for key in overrides:
        if key not in allowed:
            raise ValueError(f"{option}: unknown key {key!r}; {cls.__name__} takes {', '.join(allowed)}.")


def wan_transformer_folder(path: str) -> str:
    """The M4VWanTransformer folder of ``path``: the folder itself or ``path/transformer`` (m4v convert --from-wan)."""
    for folder in (path, os.path.join(path, "transformer")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            if config_class(folder) != WAN_CLASS:
                raise ValueError(
                    f"model.pretrained: {folder} holds a {config_class(folder)}, not an {WAN_CLASS} "
                    "(for the pyramidflow family set model.family: pyramidflow)."
                )
            return folder
    raise ValueError(
        f"model.pretrained: {path} has no config.json (nor transformer/config.json); give a save_pretrained "
        "M4VWanTransformer folder or the output folder of 'm4v convert --from-wan'."
    )


def build_wan_transformer(cfg: ModelConfig, seed: int) -> Any:
    """M4V (Wan2.1), Sec. 4.1: a named Wan config (+ overrides) or a converted / save_pretrained folder."""
    from m4v.models import M4VWanTransformer, wan_named_config

    if cfg.pretrained:
        model = load_pretrained(M4VWanTransformer, wan_transformer_folder(cfg.pretrained), "model.pretrained")
        if cfg.overrides:
            logger.warning("model.overrides are ignored when model.pretrained is set.")
        return model.float()
    check_overrides(M4VWanTransformer, cfg.overrides, "model.overrides")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model-init") % (1 << 63))
        return M4VWanTransformer(**wan_named_config(cfg.config, **cfg.overrides))


def build_transformer(cfg: ModelConfig, seed: int) -> Any:
    """A named config with overrides (initialised from ``seed``, identical on every rank) or a pretrained folder."""
    from m4v.models import M4VTransformer, named_config

    if cfg.family == "wan":
        return build_wan_transformer(cfg, seed)
    if cfg.pretrained:
        if config_class(cfg.pretrained) == WAN_CLASS:
            raise ValueError(f"model.pretrained: {cfg.pretrained} holds an {WAN_CLASS}; set model.family: wan.")
        model = load_pretrained(M4VTransformer, cfg.pretrained, "model.pretrained")
        if cfg.overrides:
            logger.warning("model.overrides are ignored when model.pretrained is set.")
        return model.float()
    check_overrides(M4VTransformer, cfg.overrides, "model.overrides")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model-init") % (1 << 63))
        return M4VTransformer(**named_config(cfg.config, **cfg.overrides))


def load_vae(spec: str, seed: int = 0) -> Any:
    """A named VAE config (random weights: smoke runs only) or a ``VideoVAE.save_pretrained`` folder.

    Wan VAEs (``wan-tiny`` or an AutoencoderKLWan folder / model folder with ``vae/``) give a
    :class:`~m4v.training.wan_objective.WanLatentVAE` (4x time; the wan family, Sec. 4.1).
    """
    from m4v.models.vae import VAE_CONFIGS, VideoVAE, build_video_vae
    from m4v.training.wan_objective import is_wan_vae_spec, load_wan_vae

    if is_wan_vae_spec(spec):
        return load_wan_vae(spec, seed)
    if spec in VAE_CONFIGS:
        logger.warning("vae: %r is a randomly initialised VAE (for tests and smoke runs, not real training).", spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "vae-init") % (1 << 63))
            return build_video_vae(spec)
    if not os.path.isdir(spec):
        raise ValueError(
            f"vae: {spec!r} is neither a named VAE config ({', '.join(VAE_CONFIGS)}, wan-tiny) nor a folder."
        )
    from diffusers import AutoencoderKLLTXVideo

    return VideoVAE(load_pretrained(AutoencoderKLLTXVideo, spec, "vae"))


def load_family_text_encoder(spec: Any, family: str = "pyramidflow") -> Any:
    """The config's text encoder; the wan family also takes Wan's ``{umt5: DIR, tokenizer: DIR, max_length: N}``."""
    from m4v.training.text import load_text_encoder_spec

    if family == "wan" and isinstance(spec, dict) and "umt5" in spec:
        from m4v.pipelines.pipeline_wan import load_wan_text_encoder

        return load_wan_text_encoder(spec)
    return load_text_encoder_spec(spec)
