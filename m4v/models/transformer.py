"""M4VTransformer: hybrid MM-DiT + MM-DiM backbone predicting the current frame's velocity (paper Sec. 3.2, Fig. 2a).

Data flow: text tokens and the patchified frames (pyramid history at mixed resolutions, then the
current noisy frame) are embedded; the dual-stream MM-DiT blocks process the two streams with joint
attention; the single-stream blocks (MM-DiM, attention, or both, by ``layout``) process the
concatenated sequence; the current frame's tokens are projected back to a latent-space velocity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from m4v.layers.embeddings import (
    AdaLNModulation,
    TimestepTextEmbedding,
    patchify,
    unpatchify,
)
from m4v.layers.zigzag import layer_path
from m4v.models.blocks import AttentionBlock, MMDiMBlock, MMDiTBlock, SequenceContext
from m4v.models.layouts import LAYOUTS, block_mixers
from m4v.models.loading import load_strict
from m4v.ops.fused import ln_modulate


@dataclass
class M4VTransformerOutput(BaseOutput):
    """Velocity prediction for the current frame, [B, C, H, W]."""

    sample: torch.Tensor


def _check_config(c: dict) -> None:
    def bad(field: str, msg: str) -> None:
        raise ValueError(f"{field}: {msg}")

    for f in ("in_channels", "patch_size", "width", "num_heads", "text_dim", "pooled_dim"):
        if int(c[f]) < 1:
            bad(f, f"must be a positive integer, got {c[f]}")
    for f in ("num_dual_layers", "num_single_layers"):
        if int(c[f]) < 0:
            bad(f, f"must be >= 0, got {c[f]}")
    if c["width"] % c["num_heads"]:
        bad("width", f"{c['width']} is not divisible by num_heads={c['num_heads']}")
    head_dim = c["width"] // c["num_heads"]
    if sum(c["axes_dims_rope"]) != head_dim or any(d % 2 for d in c["axes_dims_rope"]):
        bad("axes_dims_rope", f"{list(c['axes_dims_rope'])} must be even and sum to the head dim {head_dim}")
    if c["layout"] not in LAYOUTS:
        bad("layout", f"unknown layout {c['layout']!r}; choose one of {', '.join(LAYOUTS)}")
    if c["mlp_ratio"] <= 0:
        bad("mlp_ratio", f"must be positive, got {c['mlp_ratio']}")
    d_inner = c["ssm_expand"] * c["width"]
    if d_inner % c["ssm_headdim"]:
        bad("ssm_headdim", f"{c['ssm_headdim']} does not divide ssm_expand * width = {d_inner}")
    nheads = d_inner // c["ssm_headdim"]
    if c["ssm_ngroups"] is not None and (c["ssm_ngroups"] < 1 or nheads % c["ssm_ngroups"]):
        bad("ssm_ngroups", f"{c['ssm_ngroups']} must divide the number of SSM heads {nheads}")
    uses_extra = c["layout"] == "parallel" or c["temporal_branch"] or (
        c["temporal_branch"] is None and c["layout"] == "full_temp"
    )
    if uses_extra and c["ssm_expand"] != 1:
        bad("ssm_expand", "must be 1 with the temporal branch or the parallel layout (they share out_proj)")


class M4VTransformer(ModelMixin, ConfigMixin):
    """The M4V backbone (PyramidFlow base, MM-DiM single-stream blocks), diffusers ModelMixin/ConfigMixin."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> Any:  # type: ignore[override]
        """diffusers ``from_pretrained`` from a local folder, strict: the folder must hold this class with every
        weight (``m4v.models.loading``); nothing is downloaded."""
        load = super().from_pretrained
        return load_strict(load, cls.__name__, pretrained_model_name_or_path, **kwargs)

    _supports_gradient_checkpointing = True
    _no_split_modules = ["MMDiTBlock", "MMDiMBlock", "AttentionBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        patch_size: int = 2,
        width: int = 1920,
        num_heads: int = 30,
        num_dual_layers: int = 8,
        num_single_layers: int = 16,
        mlp_ratio: float = 4.0,
        text_dim: int = 4096,
        pooled_dim: int = 768,
        axes_dims_rope: Sequence[int] = (16, 24, 24),
        rope_theta: float = 10000.0,
        layout: str = "full_temp",
        text_recomposition: bool = True,
        registers: bool = True,
        temporal_branch: bool | None = None,
        ssm_d_state: int = 64,
        ssm_expand: int = 1,
        ssm_headdim: int = 64,
        ssm_ngroups: int | None = None,
        ssm_d_conv: int = 4,
        ssm_chunk_size: int = 256,
    ) -> None:
        super().__init__()
        _check_config(dict(self.config))
        self.gradient_checkpointing = False
        D, p = width, patch_size
        mlp_hidden = int(D * mlp_ratio)
        temporal = (layout == "full_temp") if temporal_branch is None else bool(temporal_branch)
        d_inner = ssm_expand * D
        ssm = dict(
            d_state=ssm_d_state,
            d_conv=ssm_d_conv,
            expand=ssm_expand,
            headdim=ssm_headdim,
            ngroups=ssm_ngroups or d_inner // ssm_headdim,
            chunk_size=ssm_chunk_size,
        )
        self.x_embedder = nn.Linear(in_channels * p * p, D)
        self.context_embedder = nn.Linear(text_dim, D)
        self.time_text_embed = TimestepTextEmbedding(D, pooled_dim)
        self.dual_blocks = nn.ModuleList(MMDiTBlock(D, num_heads, mlp_hidden) for _ in range(num_dual_layers))
        blocks: list[nn.Module] = []
        n_mamba = 0
        for mixer in block_mixers(layout, num_single_layers):
            if mixer == "attention":
                blocks.append(AttentionBlock(D, num_heads, mlp_hidden))
            else:
                blocks.append(
                    MMDiMBlock(
                        D,
                        num_heads,
                        mlp_hidden,
                        ssm,
                        path=layer_path(n_mamba),
                        temporal_branch=temporal and mixer == "mamba",
                        registers=registers,
                        parallel_attention=mixer == "parallel",
                    )
                )
                n_mamba += 1
        self.single_blocks = nn.ModuleList(blocks)
        self._paths = {b.path for b in blocks if isinstance(b, MMDiMBlock)}
        self._has_attention = num_dual_layers > 0 or any(m != "mamba" for m in block_mixers(layout, num_single_layers))
        self.norm_out = AdaLNModulation(D, 2)
        self.proj_out = nn.Linear(D, p * p * in_channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _frames(self, hidden_states: torch.Tensor, history: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        frames = [*history, hidden_states]
        p, C = self.config.patch_size, self.config.in_channels
        B = hidden_states.shape[0]
        for i, f in enumerate(frames):
            name = "hidden_states" if i == len(frames) - 1 else f"history[{i}]"
            if f.ndim != 4 or f.shape[0] != B or f.shape[1] != C:
                raise ValueError(f"{name}: expected a [B={B}, C={C}, H, W] latent frame, got {tuple(f.shape)}")
            if f.shape[2] % p or f.shape[3] % p:
                raise ValueError(
                    f"patch_size: {p} does not divide the latent size {tuple(f.shape[2:])} of {name}"
                )
        return frames

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        history: Sequence[torch.Tensor] = (),
        return_dict: bool = True,
        context: SequenceContext | None = None,
    ) -> M4VTransformerOutput | tuple[torch.Tensor]:
        """Velocity of the current noisy frame.

        hidden_states [B, C, H, W] the current noisy latent frame; timestep [B] in [0, 1000];
        encoder_hidden_states [B, L, text_dim] text token states with encoder_attention_mask [B, L]
        (True = real token); pooled_projections [B, pooled_dim]; history: earlier latent frames in
        time order, each [B, C, h, w] at any pyramid resolution (h, w divisible by the patch size).
        ``context``: the token layout built by ``sequence_context`` for these shapes and this text mask (CUDA
        graphs build it before capture: it holds the host-built index plans); built here when None.
        """
        p = self.config.patch_size
        frames = self._frames(hidden_states, history)
        B, L = encoder_hidden_states.shape[:2]
        if encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(B, L, dtype=torch.bool, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        sizes = self._grids(frames)
        if context is None:
            ctx = self.sequence_context(sizes, encoder_attention_mask)
        elif list(context.sizes) != sizes or context.text_mask.shape != (B, L):
            raise ValueError(
                f"context: built for token grids {list(context.sizes)} and text mask "
                f"{tuple(context.text_mask.shape)}, got {sizes} and {(B, L)}"
            )
        else:
            ctx = context
        dtype = self.x_embedder.weight.dtype
        vis = self.x_embedder(torch.cat([patchify(f.to(dtype), p) for f in frames], 1))
        txt = self.context_embedder(encoder_hidden_states.to(dtype))
        temb = self.time_text_embed(timestep, pooled_projections.to(dtype))
        for block in self.dual_blocks:
            txt, vis = self._run(block, txt, vis, temb, ctx)
        x = torch.cat([txt, vis], 1)
        for block in self.single_blocks:
            x = self._run(block, x, temb, ctx)
        h, w = sizes[-1]
        cur = x[:, x.shape[1] - h * w :]
        shift, scale = self.norm_out(temb)
        out = self.proj_out(ln_modulate(cur, shift, scale))
        out = unpatchify(out, p, self.config.in_channels, h, w).to(hidden_states.dtype)
        return M4VTransformerOutput(sample=out) if return_dict else (out,)

    def sequence_context(self, sizes: Sequence[tuple[int, int]], text_mask: torch.Tensor) -> SequenceContext:
        """Token layout of one forward (re-composition plans, RoPE, mask) for frame token grids ``sizes``."""
        ctx = SequenceContext(
            text_mask=text_mask.bool(),
            sizes=[(int(h), int(w)) for h, w in sizes],
            axes_dims=tuple(self.config.axes_dims_rope),
            rope_theta=self.config.rope_theta,
            recompose_text=self.config.text_recomposition,
            registers=self.config.registers,
        )
        ctx.prepare(self._paths, self._has_attention)
        return ctx

    def token_grids(self, hidden_states: torch.Tensor, history: Sequence[torch.Tensor] = ()) -> list[tuple[int, int]]:
        """Token grid (h, w) of every frame of a forward's input, history first."""
        return self._grids(self._frames(hidden_states, history))

    def _grids(self, frames: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
        p = self.config.patch_size
        return [(f.shape[2] // p, f.shape[3] // p) for f in frames]

    def _run(self, block: nn.Module, *args):  # noqa: ANN202 - returns what the block returns
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)
