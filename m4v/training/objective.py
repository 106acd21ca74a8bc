"""Pyramidal flow-matching loss with the temporal pyramid and history corruption (paper Sec. 3.1, Eq. 4, A.3).

One training example is one latent frame ``i`` of a clip at one pyramid stage ``k``:

* history: the clean latents of frames ``0..i-1`` compressed by :func:`temporal_pyramid_history`
  for stage ``k`` (Eq. 4; empty for ``i = 0``, the image / first-frame case), each frame noised as
  ``sigma_f * n + (1 - sigma_f) * x`` with levels linearly spaced between ``eta_min`` and ``eta_max``
  (A.3, the default) or one shared level (PyramidFlow, ``corruption="constant"``);
* input / target: :meth:`PyramidFlowMatchScheduler.sample_training_input` at stage ``k``;
* loss: mean squared error between the predicted and the target velocity;
* text dropout: with probability ``text_dropout`` a sample's text is replaced by the null text
  (the encoding of ``""``), for classifier-free guidance.

Every draw of a sample comes from its own generator seeded by (run seed, step, index in the global
batch), in a fixed order (dropout, ratio, noise, corruption levels, corruption noise), so the
result does not depend on how the global batch is split over ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m4v.models.text_encoders import TextEmbeddings
from m4v.schedulers import (
    PyramidFlowMatchScheduler,
    constant_corruption_sigmas,
    corrupt,
    linear_corruption_sigmas,
    pyramid_noise,
    temporal_pyramid_history,
)
from m4v.training.text import apply_text_dropout


@dataclass
class FlowInputs:
    """Model inputs and targets of one training example batch at one stage and frame index."""

    noisy: Tensor  # [B, C, h, w] current frame at the stage resolution
    target: Tensor  # [B, C, h, w] velocity start - end
    sigma: Tensor  # [B] float32
    ratio: Tensor  # [B] position inside the stage window (1 = start, 0 = end)
    eps: Tensor  # [B, C, h, w] the stage's noise (for the one-step estimate of Eq. 5)
    history: list[Tensor]
    text: TextEmbeddings
    dropped: Tensor  # [B] bool
    stage: int
    frame_index: int


@dataclass
class FlowOutput:
    loss: Tensor  # scalar
    per_sample: Tensor  # [B] detached
    pred: Tensor
    inputs: FlowInputs


def choose_stage(u: float, weights: Sequence[float]) -> int:
    """Pyramid stage for a uniform ``u`` in [0, 1) with probabilities proportional to ``weights`` (1:2:1)."""
    total = float(sum(weights))
    acc = 0.0
    for k, w in enumerate(weights):
        acc += float(w) / total
        if u < acc:
            return k
    return len(weights) - 1


def choose_frame(u: float, num_latent_frames: int, window: int | None = None) -> int:
    """Frame index uniform over the clip, or over its last ``window`` latent frames."""
    lo = 0 if window is None else max(0, num_latent_frames - window)
    return lo + min(int(u * (num_latent_frames - lo)), num_latent_frames - lo - 1)


def token_count(sizes: Sequence[tuple[int, int]], text_len: int, patch: int) -> int:
    """Tokens of one sample: text plus every frame's (h/p)(w/p) patches."""
    return text_len + sum((h // patch) * (w // patch) for h, w in sizes)


class PyramidFlowObjective:
    """Builds flow-matching examples and computes the velocity MSE (Sec. 3.1, A.3)."""

    def __init__(
        self,
        scheduler: PyramidFlowMatchScheduler | None = None,
        corruption: str = "linear",
        corruption_eta: float = 1.0 / 3.0,
        text_dropout: float = 0.1,
    ) -> None:
        if corruption not in ("linear", "constant", "none"):
            raise ValueError(f"corruption: must be 'linear', 'constant' or 'none', got {corruption!r}.")
        self.scheduler = scheduler or PyramidFlowMatchScheduler()
        self.corruption = corruption
        self.corruption_eta = corruption_eta
        self.text_dropout = text_dropout

    @property
    def num_stages(self) -> int:
        return int(self.scheduler.config.num_stages)

    def _history(self, clean: Tensor, frame_index: int, stage: int, gens: Sequence[torch.Generator]) -> list[Tensor]:
        if frame_index == 0:
            return []
        frames = [clean[:, :, f] for f in range(frame_index)]
        hist = temporal_pyramid_history(frames, stage, self.num_stages)
        if self.corruption == "none":
            return hist
        fn = linear_corruption_sigmas if self.corruption == "linear" else constant_corruption_sigmas
        rows: list[list[Tensor]] = []
        for j, g in enumerate(gens):
            sig = fn(frame_index, self.corruption_eta, generator=g)
            rows.append(corrupt([h[j : j + 1] for h in hist], sig, generator=g))
        return [torch.cat([r[f] for r in rows], 0) for f in range(frame_index)]

    def prepare(
        self,
        latents: Tensor,
        frame_index: int,
        stage: int,
        text: TextEmbeddings,
        null_text: TextEmbeddings | None,
        generators: Sequence[torch.Generator],
    ) -> FlowInputs:
        """Example batch for frame ``frame_index`` of clean ``latents [B, C, T, H, W]`` at pyramid ``stage``."""
        if latents.ndim != 5:
            raise ValueError(f"latents: expected [B, C, T, H, W], got {tuple(latents.shape)}.")
        B, C, T, H, W = latents.shape
        if not 0 <= frame_index < T:
            raise ValueError(f"frame_index: {frame_index} is outside the clip's {T} latent frames.")
        if len(generators) != B:
            raise ValueError(f"generators: need one per sample ({B}), got {len(generators)}.")
        dev = latents.device
        drop = torch.stack([torch.rand((), generator=g) < self.text_dropout for g in generators])
        ratio = torch.stack([torch.rand((), generator=g) for g in generators])
        noise = torch.stack([torch.randn(C, H, W, generator=g) for g in generators]).to(dev, latents.dtype)
        history = self._history(latents, frame_index, stage, generators)
        current = latents[:, :, frame_index]
        noisy, target, sigma = self.scheduler.sample_training_input(
            current, stage, noise_full=noise, ratio=ratio.to(dev)
        )
        if self.text_dropout > 0:
            if null_text is None:
                raise ValueError("null_text: text dropout needs the encoding of the empty prompt.")
            text = apply_text_dropout(text, null_text, drop)
        eps = pyramid_noise(noise, stage, self.num_stages)
        return FlowInputs(noisy, target, sigma, ratio.to(dev), eps, history, text, drop, stage, frame_index)

    def forward_model(self, model: nn.Module, inputs: FlowInputs) -> Tensor:
        """The model's velocity for ``inputs`` (timestep = sigma * num_train_timesteps)."""
        t = inputs.sigma.to(inputs.noisy.device) * float(self.scheduler.config.num_train_timesteps)
        out = model(
            hidden_states=inputs.noisy,
            timestep=t,
            encoder_hidden_states=inputs.text.token_states,
            pooled_projections=inputs.text.pooled,
            encoder_attention_mask=inputs.text.attention_mask,
            history=inputs.history,
        )
        return out.sample if hasattr(out, "sample") else out[0]

    def loss(self, model: nn.Module, inputs: FlowInputs) -> FlowOutput:
        """Velocity MSE, averaged over all elements (equal-size samples: the mean of per-sample MSEs)."""
        pred = self.forward_model(model, inputs)
        err = F.mse_loss(pred.float(), inputs.target.float(), reduction="none")
        per_sample = err.flatten(1).mean(1)
        return FlowOutput(per_sample.mean(), per_sample.detach(), pred, inputs)
