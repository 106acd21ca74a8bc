"""Patch, timestep and pooled-text embeddings of the FLUX/PyramidFlow backbone (paper Sec. 3.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> tokens [B, (H/p)(W/p), C*p*p] in row-major order."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, h: int, w: int) -> torch.Tensor:
    """Tokens [B, h*w, C*p*p] on an h x w token grid -> [B, C, h*p, w*p]."""
    B = tokens.shape[0]
    x = tokens.reshape(B, h, w, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, channels, h * p, w * p)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] (cos first) of timesteps t in [0, 1000]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class TimestepTextEmbedding(nn.Module):
    """Conditioning vector: MLP(sinusoid(t)) + MLP(pooled text); no guidance embedding."""

    def __init__(self, dim: int, pooled_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time = MLPEmbedder(freq_dim, dim)
        self.text = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t = timestep_embedding(timestep, self.freq_dim).to(pooled.dtype)
        return self.time(t) + self.text(pooled)


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(D, n*D), zero-initialised (adaLN-Zero): returns n chunks of [B, D]."""

    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.n, dim=-1)
