"""Spatial/temporal pyramid and noise utilities of pyramidal flow matching (paper Sec. 3.1, Eq. 4, A.3)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "block_noise",
    "constant_corruption_sigmas",
    "corrupt",
    "downsample",
    "linear_corruption_sigmas",
    "pyramid_noise",
    "temporal_pyramid_history",
    "upsample_nearest",
]


def _check_levels(levels: int) -> None:
    if not isinstance(levels, int) or levels < 0:
        raise ValueError(f"levels must be a non-negative int, got {levels!r}.")


Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the whole batch, or one per batch element."""


def _rand(
    shape: Sequence[int],
    generator: Generators,
    device: torch.device | str | None,
    dtype: torch.dtype,
    normal: bool,
) -> Tensor:
    """Draw on the generator's device (so a CPU generator also works for CUDA outputs), then move.

    A list of generators draws batch element ``i`` (dim 0) from ``generator[i]``, so a video generated in a
    batch gets the same noise as when it is generated alone with that generator (diffusers' convention).
    """
    fn = torch.randn if normal else torch.rand
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; give one per video.")
        parts = [fn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype).to(device) for g in generator]
        return torch.stack(parts) if parts else torch.empty(tuple(shape), device=device, dtype=dtype)
    draw_device = generator.device if generator is not None else device
    out = fn(tuple(shape), generator=generator, device=draw_device, dtype=dtype)
    return out.to(device) if device is not None else out


def downsample(x: Tensor, levels: int = 1) -> Tensor:
    """Halve the last two dims ``levels`` times by 2x2 averaging (= bilinear x0.5, align_corners=False).

    Both spatial sizes must be divisible by ``2**levels``.
    """
    _check_levels(levels)
    if levels == 0:
        return x
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims (..., H, W), got shape {tuple(x.shape)}.")
    f = 2**levels
    h, w = x.shape[-2:]
    if h % f or w % f:
        raise ValueError(f"x spatial size {h}x{w} must be divisible by 2**levels = {f} to downsample.")
    lead = x.shape[:-2]
    return x.reshape(*lead, h // f, f, w // f, f).mean(dim=(-3, -1))


def upsample_nearest(x: Tensor, levels: int = 1) -> Tensor:
    """Nearest-neighbour upsampling of the last two dims by ``2**levels``."""
    _check_levels(levels)
    if levels == 0:
        return x
    f = 2**levels
    return x.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)


def pyramid_noise(noise_full: Tensor, stage: int, num_stages: int = 3) -> Tensor:
    """Noise of ``stage`` derived from one full-resolution noise: downsample, times 2 per level.

    A 2x2 average of i.i.d. unit-variance noise has variance 1/4, so the factor 2 per level keeps unit
    variance. Stage ``num_stages - 1`` is the full resolution.
    """
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, {num_stages - 1}], got {stage}.")
    levels = num_stages - 1 - stage
    return downsample(noise_full, levels) * (2.0**levels)


def block_noise(
    shape: Sequence[int],
    gamma: float = 1.0 / 3.0,
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Gaussian noise whose aligned 2x2 spatial blocks have covariance ``(1+gamma) I - gamma 11^T``.

    Every entry has unit variance and two entries of one block have correlation ``-gamma``. Built as
    ``sqrt(1+gamma) (z - m) + sqrt(1-3 gamma) m`` with ``z`` white and ``m`` its block mean (the covariance's
    eigenvalues are ``1+gamma`` off the all-ones direction and ``1-3 gamma`` on it, so ``gamma <= 1/3``).
    """
    if not 0.0 <= gamma <= 1.0 / 3.0 + 1e-12:
        raise ValueError(f"gamma must be in [0, 1/3] for a valid block covariance, got {gamma}.")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or shape[-2] % 2 or shape[-1] % 2:
        raise ValueError(f"shape must end with two even spatial sizes (..., H, W), got {shape}.")
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    z = _rand(shape, generator, device, draw_dtype, normal=True)
    m = upsample_nearest(downsample(z, 1), 1)
    n = math.sqrt(1.0 + gamma) * (z - m) + math.sqrt(max(1.0 - 3.0 * gamma, 0.0)) * m
    return n.to(dtype)


def temporal_pyramid_history(
    clean_latents: Sequence[Tensor], stage: int, num_stages: int = 3
) -> list[Tensor]:
    """Compressed history of Eq. 4 for the frame generated after ``clean_latents`` (all at full size).

    With ``n = len(clean_latents)`` and the current frame at ``num_stages-1-stage`` downsampling levels, the
    frame ``j`` steps back (``j = 1`` is frame ``n-1``) is kept at ``min(current + j - 1, num_stages - 1)``
    levels. For 3 stages: stage 2 gives frames ``0..n-3`` at 1/4, ``n-2`` at 1/2 and ``n-1`` at full size;
    stage 1 gives ``0..n-2`` at 1/4 and ``n-1`` at 1/2; stage 0 gives all at 1/4.
    """
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, {num_stages - 1}], got {stage}.")
    n = len(clean_latents)
    current = num_stages - 1 - stage
    out: list[Tensor] = []
    for i, frame in enumerate(clean_latents):
        back = n - i
        out.append(downsample(frame, min(current + back - 1, num_stages - 1)))
    return out


def _check_eta(eta: float) -> None:
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}.")


def linear_corruption_sigmas(
    num_frames: int,
    eta: float = 1.0 / 3.0,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Linear-scaling corruption levels of paper A.3, oldest frame first.

    Draws ``eta_max ~ U(0, eta)`` and ``eta_min ~ U(0, eta_max)`` and spaces the levels linearly from
    ``eta_min`` on the oldest condition frame to ``eta_max`` on the newest one (a single frame gets
    ``eta_max``). Direction: A.3 lists the levels ``[sigma_min, ..., sigma_max]`` in the order of the
    condition frames ``[x^0, ..., x^{i-1}]`` and motivates them by error accumulation making later frames
    worse, so at inference the newest history frames are the most degraded and get the most noise.

    Returns float32 of shape ``[num_frames]``, or ``[batch_size, num_frames]`` (independent draws per
    sample) when ``batch_size`` is given; on the generator's device (CPU without a generator).
    """
    _check_eta(eta)
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}.")
    b = 1 if batch_size is None else int(batch_size)
    if b < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    u = _rand((b, 2), generator, None, torch.float32, normal=False)
    eta_max = u[:, 0] * eta
    eta_min = u[:, 1] * eta_max
    if num_frames == 1:
        sig = eta_max[:, None]
    else:
        pos = torch.linspace(0.0, 1.0, num_frames, device=u.device, dtype=torch.float32)
        sig = eta_min[:, None] + (eta_max - eta_min)[:, None] * pos[None, :]
    return sig[0] if batch_size is None else sig


def constant_corruption_sigmas(
    num_frames: int,
    eta: float = 1.0 / 3.0,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """PyramidFlow's history corruption: one ``sigma ~ U(0, eta)`` shared by all condition frames.

    Same return convention as :func:`linear_corruption_sigmas`.
    """
    _check_eta(eta)
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}.")
    b = 1 if batch_size is None else int(batch_size)
    if b < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    s = _rand((b, 1), generator, None, torch.float32, normal=False) * eta
    sig = s.expand(b, num_frames).clone()
    return sig[0] if batch_size is None else sig


def _corrupt_one(frame: Tensor, sigma: Tensor | float, generator: torch.Generator | None) -> Tensor:
    sigma_t = torch.as_tensor(sigma, dtype=frame.dtype, device=frame.device)
    if sigma_t.dim() == 1:  # per-sample sigma
        if sigma_t.shape[0] != frame.shape[0]:
            raise ValueError(
                f"sigmas has {sigma_t.shape[0]} entries per frame but the batch size is {frame.shape[0]}."
            )
        sigma_t = sigma_t.reshape(-1, *([1] * (frame.dim() - 1)))
    elif sigma_t.dim() != 0:
        raise ValueError(f"a frame's sigma must be a scalar or a [batch] vector, got {tuple(sigma_t.shape)}.")
    noise = _rand(frame.shape, generator, frame.device, frame.dtype, normal=True)
    return sigma_t * noise + (1.0 - sigma_t) * frame


def corrupt(
    frames: Tensor | Sequence[Tensor],
    sigmas: Tensor | float,
    generator: torch.Generator | None = None,
) -> Tensor | list[Tensor]:
    """Noise condition frames: ``sigma * noise + (1 - sigma) * frame`` with fresh white noise.

    ``frames`` is either one tensor ``[B, ...]`` with ``sigmas`` a scalar or ``[B]``, or a list of frames
    (possibly of different resolutions) with ``sigmas`` of shape ``[F]`` or ``[B, F]`` (column ``i`` for
    frame ``i``), as returned by the ``*_corruption_sigmas`` functions.
    """
    if isinstance(frames, Tensor):
        return _corrupt_one(frames, sigmas, generator)
    frames = list(frames)
    sig = torch.as_tensor(sigmas)
    if sig.dim() == 0 or sig.shape[-1] != len(frames) or sig.dim() > 2:
        raise ValueError(
            f"sigmas must have shape [F] or [B, F] with F = {len(frames)} frames, got {tuple(sig.shape)}."
        )
    return [_corrupt_one(f, sig[..., i], generator) for i, f in enumerate(frames)]
