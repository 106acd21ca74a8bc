"""Mamba2 mixer (SSD) used inside the MM-DiM block (paper Sec. 3.1, eqs. 1-3; Dao & Gu 2024)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from m4v.layers.norms import GatedRMSNorm
from m4v.ops import causal_conv1d, ssd
from m4v.ops.norm import upcast


class Mamba2Mixer(nn.Module):
    """in_proj -> [z | x | B | C | dt]; causal depthwise conv + SiLU on xBC; SSD scan; gated RMSNorm; out_proj.

    ``inner`` returns the gated, normalised SSM output (width ``d_inner``) so a block can add other
    branches (temporal branch, parallel attention) before the shared ``out_proj``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"Mamba2Mixer: d_inner {self.d_inner} is not divisible by headdim {headdim}")
        self.headdim, self.nheads = headdim, self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"Mamba2Mixer: nheads {self.nheads} is not divisible by ngroups {ngroups}")
        self.ngroups, self.chunk_size = ngroups, chunk_size
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, d_conv))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // ngroups, eps=norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self._init = (dt_min, dt_max, dt_init_floor, A_init_range)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba2 init: dt log-uniform in [dt_min, dt_max] (floored) via inverse softplus; A ~ U(1, 16); D = 1."""
        dt_min, dt_max, floor, (a0, a1) = self._init
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        self.dt_bias.copy_(softplus_inverse(dt))
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(a0, a1)))
        self.D.fill_(1.0)
        bound = 1.0 / math.sqrt(self.d_conv)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)

    def split_projection(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split the in_proj output into z [.., d_inner], xBC [.., conv_dim], dt [.., nheads]; padding dropped."""
        sizes = [self.d_inner, self.conv_dim, self.nheads]
        z, xbc, dt, _ = torch.split(zxbcdt, [*sizes, zxbcdt.shape[-1] - sum(sizes)], dim=-1)  # backward: one cat
        return z, xbc, dt

    def project(self, u: torch.Tensor) -> torch.Tensor:
        """in_proj of ``u``, on CUDA with its output padded to 16-byte rows (``aligned_linear``)."""
        if hasattr(self.in_proj, "_hf_hook"):  # accelerate's per-module offload moves the weight in its own forward
            return self.in_proj(u)
        return aligned_linear(u, self.in_proj.weight, self.in_proj.bias)

    def inner(self, u: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Gated SSM output [B, S, d_inner] for input [B, S, d_model]; ``keep`` [B, S] zeroes padding inputs."""
        b, s, _ = u.shape
        z, xbc, dt = self.split_projection(self.project(u))
        # padding tokens (keep == False) are zero before the conv and zero after it: the state stays exactly 0
        xbc = causal_conv1d(xbc, self.conv_weight, self.conv_bias, activation="silu", seq_mask=keep)
        x, B, C = torch.split(xbc, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1)
        y = ssd(
            x.reshape(b, s, self.nheads, self.headdim),
            dt,
            -torch.exp(upcast(self.A_log)),
            B.reshape(b, s, self.ngroups, self.d_state),
            C.reshape(b, s, self.ngroups, self.d_state),
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            chunk_size=self.chunk_size,
        )
        return self.norm(y.reshape(b, s, self.d_inner), z)

    def forward(self, u: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.out_proj(self.inner(u, keep))


def aligned_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, align: int | None = None
) -> torch.Tensor:
    """``F.linear`` whose output width is zero-padded to a multiple of ``align`` (default 8 on CUDA, 1 elsewhere).

    cuBLAS takes its fast bf16 kernels only for 16-byte-aligned rows: Mamba2's in_proj at width 1920 has 7710
    outputs and ran at 245 TFLOP/s on an H100 against 630-690 at 7712 outputs, forward and backward
    (``benchmarks/results/matmul_align_h100.json``). The weight is padded per call (a copy of the weight, cheap
    next to the product); the first ``weight.shape[0]`` columns are ``F.linear(x, weight, bias)``.
    """
    pad = -weight.shape[0] % (align if align is not None else (8 if x.is_cuda else 1))
    if pad:
        weight = F.pad(weight, (0, 0, 0, pad))
        bias = None if bias is None else F.pad(bias, (0, pad))
    return F.linear(x, weight, bias)


def softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    """Inverse of softplus, used for the dt bias init."""
    return x + torch.log(-torch.expm1(-x))


__all__ = ["Mamba2Mixer", "aligned_linear", "softplus_inverse"]
