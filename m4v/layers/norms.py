"""Normalisations: RMSNorm (q/k norm of MM-DiT) and the gated RMSNorm of Mamba2."""

from __future__ import annotations

import torch
from torch import nn

from m4v.ops.fused import rms_norm  # compiled on CUDA, the torch reference elsewhere
from m4v.ops.norm import gated_rms_norm  # fused Triton kernel on CUDA, the torch reference elsewhere


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learnable scale (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Mamba2's gated RMSNorm: ``rmsnorm(y * silu(z))`` normalised per group of ``group_size`` channels."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        if dim % group_size:
            raise ValueError(f"GatedRMSNorm: dim {dim} is not divisible by group_size {group_size}")
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(y, z, self.weight, self.group_size, self.eps)
