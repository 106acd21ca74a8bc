"""Training the M4V (Wan2.1) family (paper Sec. 4.1): whole-video latents and full-sequence flow matching.

"M4V (Wan2.1) does not perform pyramidal downsampling of video latents, and both flow matching loss
calculation and reward learning are applied to the entire video latent." One training example is a
whole clip: Wan's VAE (``AutoencoderKLWan``, 4x time, 8x space, latents normalised by its
``latents_mean`` / ``latents_std``) encodes it, and the loss is the rectified-flow objective of
:func:`m4v.pipelines.pipeline_wan.wan_flow_matching_loss` on every latent frame at once:
``sigma = shift(u)``, ``u ~ U(0, 1)``, ``x_t = (1 - sigma) x_0 + sigma * noise``, timestep
``1000 * sigma``, MSE to the velocity ``noise - x_0``.

Two differences to that function, both for the trainer's guarantees:

* every sample draws from its own generator (seeded by run seed, step and index in the global batch)
  in the function's order (``u``, noise, dropout), so one process and N ranks see the same numbers and
  a resumed run is exact; for one sample the result equals ``wan_flow_matching_loss``;
* a dropped text becomes the *null text* (the encoding of ``""``), like the pyramidflow trainer,
  because ``M4VWanPipeline``'s unconditional branch encodes the negative prompt ``""`` too.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m4v.models.text_encoders import TextEmbeddings
from m4v.training.text import apply_text_dropout

logger = logging.getLogger(__name__)

WAN_VAE_CLASS = "AutoencoderKLWan"
# Random-weight Wan VAEs for tests and smoke runs (the tiny one of tests/test_pipelines_wan.py).
WAN_VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "wan-tiny": dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
}


# ------------------------------------------------------------------------------------------------- VAE
class WanLatentVAE(nn.Module):
    """Frozen Wan VAE with the trainer's interface: pixels in [-1, 1] -> normalised whole-video latents."""

    temporal_compression = 4
    spatial_compression = 8

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.z_dim)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> WanLatentVAE:  # stays frozen in eval mode
        super().train(False)
        return self

    @torch.no_grad()
    def encode(self, video: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """[B, 3, 1 + 4k, H, W] -> [B, C, 1 + k, H/8, W/8] as ``M4VWanPipeline.encode_video``: (z - mean) / std."""
        from m4v.pipelines.pipeline_wan import wan_latent_stats

        dist = self.model.encode(video.to(self.device, self.dtype)).latent_dist
        z = (dist.sample(generator) if sample else dist.mode()).float()
        mean, std = wan_latent_stats(self.model, z)
        return (z - mean) / std


def wan_vae_folder(spec: str) -> str | None:
    """The AutoencoderKLWan folder named by ``spec`` (the folder itself or its ``vae/``), else None."""
    for folder in (spec, os.path.join(spec, "vae")):
        path = os.path.join(folder, "config.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    if json.load(f).get("_class_name") == WAN_VAE_CLASS:
                        return folder
            except (OSError, json.JSONDecodeError):
                return None
    return None


def is_wan_vae_spec(spec: str) -> bool:
    """True for a named Wan VAE config or a folder holding an AutoencoderKLWan."""
    return spec in WAN_VAE_CONFIGS or (os.path.isdir(spec) and wan_vae_folder(spec) is not None)


def load_wan_vae(spec: str, seed: int = 0) -> WanLatentVAE:
    """A named Wan VAE config (random weights: smoke runs only) or an AutoencoderKLWan folder (or DIR/vae)."""
    from diffusers import AutoencoderKLWan

    from m4v.training.seeding import derive_seed

    if spec in WAN_VAE_CONFIGS:
        logger.warning("vae: %r is a randomly initialised Wan VAE (for tests and smoke runs, not real training).", spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "vae-init") % (1 << 63))
            return WanLatentVAE(AutoencoderKLWan(**WAN_VAE_CONFIGS[spec]))
    folder = wan_vae_folder(spec) if os.path.isdir(spec) else None
    if folder is None:
        raise ValueError(
            f"vae: {spec!r} is neither a named Wan VAE config ({', '.join(WAN_VAE_CONFIGS)}) nor a folder "
            f"holding an {WAN_VAE_CLASS} (config.json, or vae/config.json)."
        )
    return WanLatentVAE(AutoencoderKLWan.from_pretrained(folder, local_files_only=True))


# ------------------------------------------------------------------------------------------- objective
def _draw(shape: Sequence[int], g: torch.Generator, device: torch.device, normal: bool) -> Tensor:
    """Draw on the generator's device (a CPU generator also serves CUDA), then move."""
    fn = torch.randn if normal else torch.rand
    return fn(tuple(shape), generator=g, device=g.device, dtype=torch.float32).to(device)


@dataclass
class WanFlowInputs:
    """Model inputs and targets of one whole-video batch."""

    noisy: Tensor  # [B, C, T, h, w] x_t
    target: Tensor  # [B, C, T, h, w] velocity noise - x_0
    sigma: Tensor  # [B] shifted noise level
    text: TextEmbeddings
    dropped: Tensor  # [B] bool


@dataclass
class WanFlowOutput:
    loss: Tensor  # scalar
    per_sample: Tensor  # [B] detached
    pred: Tensor
    inputs: WanFlowInputs


def wan_token_count(latent_shape: Sequence[int], text_len: int, patch: Sequence[int]) -> int:
    """Tokens of one sample: text plus every latent frame's patches (T/pt)(h/ph)(w/pw)."""
    T, h, w = latent_shape[-3:]
    return text_len + (T // patch[0]) * (h // patch[1]) * (w // patch[2])


class WanFlowObjective:
    """Full-sequence rectified flow on the whole video latent (Sec. 4.1), per-sample generators."""

    def __init__(self, text_dropout: float = 0.1, text_len: int | None = None, num_train_timesteps: int = 1000):
        if not 0.0 <= text_dropout <= 1.0:
            raise ValueError(f"text_dropout: must be in [0, 1], got {text_dropout}.")
        self.text_dropout = text_dropout
        self.text_len = text_len
        self.num_train_timesteps = num_train_timesteps
        self._warned = False

    def prepare(
        self,
        latents: Tensor,
        text: TextEmbeddings,
        null_text: TextEmbeddings | None,
        generators: Sequence[torch.Generator],
        shift: float,
    ) -> WanFlowInputs:
        """Noisy latents and velocity targets of clean ``latents [B, C, T, h, w]`` at Wan's shifted sigma."""
        from m4v.pipelines.pipeline_wan import shift_sigma

        if latents.ndim != 5:
            raise ValueError(f"latents: expected [B, C, T, h, w], got {tuple(latents.shape)}.")
        if not shift > 0:
            raise ValueError(f"shift: must be positive, got {shift}.")
        B, dev = latents.shape[0], latents.device
        if len(generators) != B:
            raise ValueError(f"generators: need one per sample ({B}), got {len(generators)}.")
        shape = (1, *latents.shape[1:])
        u, noise, drop = [], [], []
        for g in generators:  # the order of wan_flow_matching_loss: u, noise, then the dropout draw
            u.append(_draw((1,), g, dev, normal=False))
            noise.append(_draw(shape, g, dev, normal=True))
            drop.append(_draw((1,), g, dev, normal=False) < self.text_dropout)
        sigma = shift_sigma(torch.cat(u), shift)
        x0, eps = latents.float(), torch.cat(noise)
        s = sigma.view(B, 1, 1, 1, 1)
        dropped = torch.cat(drop)
        if self.text_dropout > 0:
            if null_text is None:
                raise ValueError("null_text: text dropout needs the encoding of the empty prompt.")
            text = apply_text_dropout(text, null_text, dropped)
        return WanFlowInputs((1 - s) * x0 + s * eps, eps - x0, sigma, self._fit_text(text), dropped)

    def _fit_text(self, text: TextEmbeddings) -> TextEmbeddings:
        """Cut token states to the transformer's ``text_len`` (as ``M4VWanPipeline.encode_prompt`` does)."""
        L = text.token_states.shape[1]
        if self.text_len is None or L <= self.text_len:
            return text
        if not self._warned:
            logger.warning("text: prompts were cut to the transformer's text_len=%d tokens.", self.text_len)
            self._warned = True
        n = self.text_len
        return TextEmbeddings(text.token_states[:, :n], text.attention_mask[:, :n], text.pooled)

    def forward_model(self, model: nn.Module, inputs: WanFlowInputs) -> Tensor:
        """The model's velocity of the whole video (timestep = sigma * num_train_timesteps)."""
        out = model(
            hidden_states=inputs.noisy,
            timestep=inputs.sigma * float(self.num_train_timesteps),
            encoder_hidden_states=inputs.text.token_states,
            encoder_attention_mask=inputs.text.attention_mask,
        )
        return out.sample if hasattr(out, "sample") else out[0]

    def loss(self, model: nn.Module, inputs: WanFlowInputs) -> WanFlowOutput:
        """Velocity MSE over every element of the whole video latent (equal-size samples: mean of per-sample MSEs)."""
        pred = self.forward_model(model, inputs)
        err = F.mse_loss(pred.float(), inputs.target.float(), reduction="none")
        per_sample = err.flatten(1).mean(1)
        return WanFlowOutput(per_sample.mean(), per_sample.detach(), pred, inputs)
