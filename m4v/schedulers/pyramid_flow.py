"""Pyramidal flow-matching scheduler: stage windows, Euler steps, block-noise renoising (paper Sec. 3.1).

Conventions (PyramidFlow's spatial pyramid; stage ``k`` of ``S`` works at ``2**(S-1-k)`` times below the
full latent size, the last stage at full size):

- Each stage ``k`` owns a sigma window ``(s_k, e_k)``; inside it the sample follows a straight path
  ``x(r) = r * start + (1 - r) * end`` with the stage-local ratio ``r = (sigma - e_k) / (s_k - e_k)``
  going from 1 to 0, where ``start = s_k eps + (1 - s_k) up(clean_{k-1})`` and
  ``end = e_k eps + (1 - e_k) clean_k``.
- The model predicts the training target ``v = start - end`` (PyramidFlow's target), i.e. ``dx/dr``. The
  Euler step therefore advances by the change of ``r``: ``x += (r_next - r) v``, which is the same as
  ``x += (sigma_next - sigma) / (s_k - e_k) * v``. (Using ``x += (sigma_next - sigma) v`` with this target
  would only cover a fraction ``s_k - e_k`` of each stage.)
- The model's timestep is ``sigma * num_train_timesteps`` with the global sigma of the window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from torch import Tensor

from .pyramid import Generators, _rand, block_noise, downsample, pyramid_noise, upsample_nearest

__all__ = ["PyramidFlowMatchScheduler", "PyramidFlowSchedulerOutput"]


@dataclass
class PyramidFlowSchedulerOutput(BaseOutput):
    """Output of :meth:`PyramidFlowMatchScheduler.step`: the sample after one Euler step."""

    prev_sample: Tensor


class PyramidFlowMatchScheduler(SchedulerMixin, ConfigMixin):
    """Euler sampler and training-pair builder for pyramidal flow matching (paper Sec. 3.1).

    Args:
        num_stages: number of spatial pyramid stages (resolutions ``1/2**(S-1), ..., 1/2, 1``).
        gamma: block-noise correlation magnitude used at stage transitions, in ``(0, 1/3]``.
        stage_range: ``S + 1`` increasing fractions of the training time axis from 0 to 1; stage ``k``
            spans ``[stage_range[k], stage_range[k+1]]``. Boundaries are snapped onto the training
            sigma grid ``sigma_i = 1 - i / num_train_timesteps`` with ``i = floor(range * N)`` (why the
            raw boundaries for ``1/3, 2/3`` are 0.667 and 0.334, not 2/3 and 1/3).
        num_train_timesteps: ``N``; the model's timestep is ``sigma * N``.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_stages: int = 3,
        gamma: float = 1.0 / 3.0,
        stage_range: Sequence[float] = (0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0),
        num_train_timesteps: int = 1000,
    ) -> None:
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}.")
        if not 0.0 < gamma <= 1.0 / 3.0 + 1e-12:
            raise ValueError(f"gamma must be in (0, 1/3], got {gamma}.")
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an int >= 1, got {num_train_timesteps!r}.")
        rng = [float(v) for v in stage_range]
        if len(rng) != num_stages + 1:
            raise ValueError(
                f"stage_range must have num_stages + 1 = {num_stages + 1} entries, got {len(rng)}."
            )
        if rng[0] != 0.0 or rng[-1] != 1.0 or any(b <= a for a, b in zip(rng, rng[1:])):
            raise ValueError(f"stage_range must increase strictly from 0 to 1, got {rng}.")
        self._raw = [self._snap(v, num_train_timesteps) for v in rng]
        if any(b >= a for a, b in zip(self._raw, self._raw[1:])):
            raise ValueError(
                f"stage_range {rng} collapses a stage on a grid of num_train_timesteps={num_train_timesteps}."
            )
        self._windows = self._compute_windows()
        self._sigmas: list[Tensor] | None = None
        self._ratios: list[Tensor] | None = None
        self.timesteps: Tensor | None = None
        self.num_inference_steps: list[int] | None = None

    # ------------------------------------------------------------------ windows and transitions
    @staticmethod
    def _snap(v: float, n: int) -> float:
        """Raw sigma of a stage boundary on the training grid ``1 - i/N``, ``i = floor(v N)``."""
        return 1.0 - math.floor(v * n + 1e-9) / n

    def _coefficients(self, stage: int) -> tuple[float, float, float]:
        """``(a, b, corrected_start)`` for entering ``stage`` from the previous stage's end."""
        g = float(self.config.gamma)
        s_c = 1.0 - self._raw[stage]  # clean fraction at the previous stage's end
        denom = math.sqrt(1.0 + 1.0 / g) * (1.0 - s_c) + s_c
        a = 1.0 / denom
        b = a * (1.0 - s_c) / math.sqrt(g)
        return a, b, 1.0 - s_c / denom

    def _compute_windows(self) -> list[tuple[float, float]]:
        windows = []
        for k in range(self.config.num_stages):
            start = self._raw[k] if k == 0 else self._coefficients(k)[2]
            windows.append((start, self._raw[k + 1]))
        return windows

    def _check_stage(self, stage: int) -> None:
        if not isinstance(stage, int) or not 0 <= stage < self.config.num_stages:
            raise ValueError(f"stage must be an int in [0, {self.config.num_stages - 1}], got {stage!r}.")

    @property
    def stage_windows(self) -> list[tuple[float, float]]:
        """``(start_sigma, end_sigma)`` per stage; starts after stage 0 carry the renoising correction."""
        return list(self._windows)

    def transition_coefficients(self, stage: int) -> tuple[float, float]:
        """``(a, b)`` of the jump into ``stage >= 1``: ``x = a * up(x_prev_end) + b * block_noise``.

        With ``s_c = 1 - e_{k-1}`` the clean fraction at the previous end, ``a = 1 / (sqrt(1 + 1/gamma)
        (1 - s_c) + s_c)`` and ``b = a (1 - s_c) / sqrt(gamma)``: the block noise cancels the 2x2
        correlation of the upsampled noise, leaving white noise of std ``s_k`` and clean part ``1 - s_k``.
        """
        self._check_stage(stage)
        if stage == 0:
            raise ValueError(
                "stage must be >= 1 for transition_coefficients (stage 0 starts from pure noise)."
            )
        a, b, _ = self._coefficients(stage)
        return a, b

    # ------------------------------------------------------------------ inference
    def set_timesteps(
        self, num_inference_steps: int | Sequence[int], device: torch.device | str | None = None
    ):
        """Build per-stage grids: ``n_k + 1`` sigmas from ``s_k`` to ``e_k`` (``n_k`` Euler steps).

        ``num_inference_steps`` is one count per stage or an int used for every stage. ``self.timesteps``
        is the concatenation of all stages' model timesteps.
        """
        s = self.config.num_stages
        steps = (
            [num_inference_steps] * s if isinstance(num_inference_steps, int) else list(num_inference_steps)
        )
        if len(steps) != s or any(not isinstance(n, int) or n < 1 for n in steps):
            raise ValueError(
                f"num_inference_steps must be an int >= 1 or {s} such ints (one per stage), "
                f"got {num_inference_steps!r}."
            )
        sigmas, ratios = [], []
        for (start, end), n in zip(self._windows, steps):
            r = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
            ratios.append(r.to(device=device, dtype=torch.float32))
            sigmas.append((end + r * (start - end)).to(device=device, dtype=torch.float32))
        self._sigmas, self._ratios = sigmas, ratios
        self.num_inference_steps = steps
        self.timesteps = torch.cat([self.timesteps_for_stage(k) for k in range(s)])

    def _grids(self, stage: int) -> tuple[Tensor, Tensor]:
        if self._sigmas is None or self._ratios is None:
            raise ValueError("set_timesteps must be called before querying sigmas, timesteps or step.")
        self._check_stage(stage)
        return self._sigmas[stage], self._ratios[stage]

    def sigmas_for_stage(self, stage: int) -> Tensor:
        """The ``n + 1`` sigmas of ``stage`` from its start to its end (float32)."""
        return self._grids(stage)[0]

    def timesteps_for_stage(self, stage: int) -> Tensor:
        """The ``n`` model timesteps ``sigma * num_train_timesteps`` where ``stage`` evaluates the model."""
        return self._grids(stage)[0][:-1] * self.config.num_train_timesteps

    def step(
        self,
        model_output: Tensor,
        stage: int,
        step_index: int,
        sample: Tensor,
        return_dict: bool = True,
    ) -> PyramidFlowSchedulerOutput | tuple[Tensor]:
        """One Euler step from grid point ``step_index`` to ``step_index + 1`` of ``stage``.

        ``model_output`` is the velocity ``start - end`` (see the module docstring); the update is
        ``x + (r_next - r) * v = x + (sigma_next - sigma) / (s_k - e_k) * v``, computed in float32.
        """
        _, ratios = self._grids(stage)
        n = ratios.shape[0] - 1
        if not isinstance(step_index, int) or not 0 <= step_index < n:
            raise ValueError(
                f"step_index must be an int in [0, {n - 1}] for stage {stage}, got {step_index!r}."
            )
        dr = (ratios[step_index + 1] - ratios[step_index]).item()
        prev = (sample.float() + dr * model_output.float()).to(sample.dtype)
        if not return_dict:
            return (prev,)
        return PyramidFlowSchedulerOutput(prev_sample=prev)

    def renoise_for_next_stage(
        self, sample: Tensor, next_stage: int, generator: Generators = None
    ) -> Tensor:
        """Jump from the end of ``next_stage - 1`` to the start of ``next_stage``.

        Nearest 2x upsample of the last two dims, then ``a * x + b * n`` with block noise ``n``.
        """
        a, b = self.transition_coefficients(next_stage)
        x = upsample_nearest(sample, 1).float()
        noise = block_noise(x.shape, self.config.gamma, generator, device=x.device, dtype=torch.float32)
        return (a * x + b * noise).to(sample.dtype)

    # ------------------------------------------------------------------ training
    def stage_endpoints(self, clean_full: Tensor, stage: int, noise_full: Tensor) -> tuple[Tensor, Tensor]:
        """``(start, end)`` of ``stage``'s straight path at that stage's resolution.

        ``start = s eps + (1 - s) up(clean at the previous stage's resolution)`` (pure ``eps`` at stage 0)
        and ``end = e eps + (1 - e) clean_at_stage``, with ``eps = pyramid_noise(noise_full, stage)``.
        """
        self._check_stage(stage)
        if noise_full.shape != clean_full.shape:
            raise ValueError(
                f"noise_full shape {tuple(noise_full.shape)} must equal "
                f"clean_full shape {tuple(clean_full.shape)}."
            )
        num = self.config.num_stages
        levels = num - 1 - stage
        s, e = self._windows[stage]
        eps = pyramid_noise(noise_full, stage, num)
        clean = downsample(clean_full, levels)
        end = e * eps + (1.0 - e) * clean
        if stage == 0:  # stage_range starts at 0, so s = 1: pure noise
            start = eps
        else:
            start = s * eps + (1.0 - s) * upsample_nearest(downsample(clean_full, levels + 1), 1)
        return start, end

    def sample_training_input(
        self,
        clean_full: Tensor,
        stage: int,
        noise_full: Tensor | None = None,
        generator: torch.Generator | None = None,
        ratio: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Training triple ``(noisy, target_velocity, sigma)`` for ``clean_full [B, ..., H, W]`` at ``stage``.

        ``noisy = r * start + (1 - r) * end`` with ``r ~ U(0, 1)`` per sample (or the given ``ratio [B]``),
        ``target_velocity = start - end`` and ``sigma = r s + (1 - r) e`` (shape ``[B]``, float32); the model
        receives ``sigma * num_train_timesteps`` as its timestep. ``noise_full`` defaults to white noise.
        """
        if clean_full.dim() < 3:
            raise ValueError(
                f"clean_full must be [B, ..., H, W] with >= 3 dims, got {tuple(clean_full.shape)}."
            )
        bsz = clean_full.shape[0]
        if noise_full is None:
            noise_full = _rand(clean_full.shape, generator, clean_full.device, clean_full.dtype, normal=True)
        if ratio is None:
            ratio = _rand((bsz,), generator, clean_full.device, torch.float32, normal=False)
        else:
            ratio = torch.as_tensor(ratio, dtype=torch.float32, device=clean_full.device)
            if ratio.shape != (bsz,):
                raise ValueError(f"ratio must have shape [{bsz}], got {tuple(ratio.shape)}.")
        start, end = self.stage_endpoints(clean_full, stage, noise_full)
        r = ratio.to(start.dtype).reshape(-1, *([1] * (start.dim() - 1)))
        noisy = r * start + (1.0 - r) * end
        s, e = self._windows[stage]
        sigma = ratio * s + (1.0 - ratio) * e
        return noisy, start - end, sigma

    def __len__(self) -> int:
        return self.config.num_train_timesteps
