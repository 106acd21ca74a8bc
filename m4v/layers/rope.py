"""3D rotary position embedding over (t, h, w) as in PyramidFlow/FLUX (paper Sec. 3.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def frame_positions(
    sizes: Sequence[tuple[int, int]], current: tuple[int, int], text_len: int, device: torch.device | None = None
) -> torch.Tensor:
    """(t, h, w) positions [text_len + sum(h*w), 3] for text (all zero) followed by frames in time order.

    Frame k has t = k; a lower-resolution frame's h/w positions are interpolated onto the current
    frame's grid (pixel centres aligned), so the same place in space has the same position.
    """
    H, W = current
    parts = [torch.zeros(text_len, 3, dtype=torch.float64)]
    for t, (h, w) in enumerate(sizes):
        rows = (torch.arange(h, dtype=torch.float64) + 0.5) * (H / h) - 0.5
        cols = (torch.arange(w, dtype=torch.float64) + 0.5) * (W / w) - 0.5
        rr, cc = torch.meshgrid(rows, cols, indexing="ij")
        parts.append(torch.stack([torch.full_like(rr, float(t)), rr, cc], -1).reshape(-1, 3))
    return torch.cat(parts).to(device=device, dtype=torch.float32)


def rope_cos_sin(
    positions: torch.Tensor, axes_dims: Sequence[int], theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [N, head_dim // 2] for positions [N, len(axes_dims)]."""
    angles = []
    for i, d in enumerate(axes_dims):
        freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d)
        angles.append(positions[:, i : i + 1].double() * freqs[None])
    ang = torch.cat(angles, -1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of x [B, heads, N, head_dim] by the given angles."""
    xf = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).unflatten(-1, (-1, 2))
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1)
    return out.flatten(-2).to(x.dtype)
