"""Backbone blocks (paper Fig. 2): MM-DiT dual-stream, single-stream attention (baseline), MM-DiM."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from m4v.layers.attention import (
    QKNorm,
    attention,
    attention_backend,
    frame_causal_block_mask,
    frame_causal_mask,
    joint_qkv,
)
from m4v.layers.embeddings import AdaLNModulation
from m4v.layers.mamba2 import Mamba2Mixer
from m4v.layers.recomposition import NUM_REGISTER_TYPES, RecompositionPlan, TextArrangement
from m4v.layers.rope import frame_positions, rope_cos_sin
from m4v.layers.temporal_branch import TemporalBranch
from m4v.ops.fused import gated_residual, ln_modulate


@dataclass
class SequenceContext:
    """What every block needs to know about one forward pass's token layout (built once per forward)."""

    text_mask: torch.Tensor  # [B, L] bool
    sizes: list[tuple[int, int]]  # token grid of each frame, time order, current frame last
    axes_dims: tuple[int, ...]
    rope_theta: float
    recompose_text: bool = True
    registers: bool = True
    attention: str | None = None  # "sdpa" or "flex" (FlexAttention BlockMask); None reads M4V_ATTENTION
    _cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.attention = attention_backend(self.attention)

    @property
    def text_len(self) -> int:
        return self.text_mask.shape[1]

    @property
    def rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "rope" not in self._cache:
            pos = frame_positions(self.sizes, self.sizes[-1], self.text_len, self.text_mask.device)
            self._cache["rope"] = rope_cos_sin(pos, self.axes_dims, self.rope_theta)
        return self._cache["rope"]

    @property
    def attn_mask(self) -> torch.Tensor | BlockMask | None:
        """Temporal-causal mask over [text, frames] with text padding removed; None when nothing is masked.

        A dense boolean [B, 1, N, N] tensor for the ``sdpa`` backend, a FlexAttention BlockMask for ``flex``.
        """
        if "mask" not in self._cache:
            full_text = bool(self.text_mask.all())
            if len(self.sizes) == 1 and full_text:
                self._cache["mask"] = None
            else:
                dev = self.text_mask.device
                ids = [torch.full((self.text_len,), -1, device=dev)]
                ids += [torch.full((h * w,), f, device=dev) for f, (h, w) in enumerate(self.sizes)]
                nv = sum(h * w for h, w in self.sizes)
                key_valid = torch.cat([self.text_mask, self.text_mask.new_ones(self.text_mask.shape[0], nv)], 1)
                build = frame_causal_block_mask if self.attention == "flex" else frame_causal_mask
                self._cache["mask"] = build(torch.cat(ids), None if full_text else key_valid)
        return self._cache["mask"]

    @torch.compiler.disable
    def prepare(self, paths: set[int], attention: bool) -> None:
        """Build everything the blocks will ask for up front (index plans, RoPE, mask): one graph break."""
        for path in paths:
            self.plan(path)
        if attention:
            _ = self.rope, self.attn_mask

    def plan(self, path: int) -> RecompositionPlan:
        key = ("plan", path)
        if key not in self._cache:
            if "text" not in self._cache:
                self._cache["text"] = TextArrangement.from_mask(self.text_mask)
            self._cache[key] = RecompositionPlan.build(
                self.sizes, self.text_mask, path, self.recompose_text, self.registers, text=self._cache["text"]
            )
        return self._cache[key]


class FeedForward(nn.Module):
    """GELU-tanh MLP with hidden width ``mlp_ratio * dim``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class MMDiTBlock(nn.Module):
    """Dual-stream MM-DiT block: per-stream adaLN-Zero, joint attention over [text, video], per-stream MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.ada_txt, self.ada_vis = AdaLNModulation(dim, 6), AdaLNModulation(dim, 6)
        self.qkv_txt, self.qkv_vis = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.qk_txt, self.qk_vis = QKNorm(num_heads, dim // num_heads), QKNorm(num_heads, dim // num_heads)
        self.out_txt, self.out_vis = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mlp_txt, self.mlp_vis = FeedForward(dim, mlp_hidden), FeedForward(dim, mlp_hidden)

    def forward(
        self, txt: torch.Tensor, vis: torch.Tensor, temb: torch.Tensor, ctx: SequenceContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t_mod, v_mod = self.ada_txt(temb), self.ada_vis(temb)
        h_t = ln_modulate(txt, t_mod[0], t_mod[1])
        h_v = ln_modulate(vis, v_mod[0], v_mod[1])
        q, k, v = joint_qkv([self.qkv_txt(h_t), self.qkv_vis(h_v)], [self.qk_txt, self.qk_vis], ctx.rope)
        o = attention(q, k, v, ctx.attn_mask)
        o_txt, o_vis = o.split([txt.shape[1], vis.shape[1]], 1)  # backward: one cat, not two zero-filled slices
        txt = gated_residual(txt, t_mod[2], self.out_txt(o_txt))
        vis = gated_residual(vis, v_mod[2], self.out_vis(o_vis))
        txt = gated_residual(txt, t_mod[5], self.mlp_txt(ln_modulate(txt, t_mod[3], t_mod[4])))
        vis = gated_residual(vis, v_mod[5], self.mlp_vis(ln_modulate(vis, v_mod[3], v_mod[4])))
        return txt, vis


class SingleStreamBlock(nn.Module):
    """Shared part of the single-stream blocks: adaLN (shift, scale, gate), mixer and MLP in parallel."""

    def __init__(self, dim: int, mlp_hidden: int) -> None:
        super().__init__()
        self.ada = AdaLNModulation(dim, 3)
        self.mlp = FeedForward(dim, mlp_hidden)

    def mix(self, h: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, temb: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        shift, scale, gate = self.ada(temb)
        h = ln_modulate(x, shift, scale)
        return gated_residual(x, gate, self.mix(h, ctx), self.mlp(h))


class AttentionBlock(SingleStreamBlock):
    """Single-stream attention block with the temporal-causal mask (PyramidFlow's block, the baseline)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__(dim, mlp_hidden)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qk_norm = QKNorm(num_heads, dim // num_heads)
        self.out = nn.Linear(dim, dim, bias=False)

    def mix(self, h: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        return self.out(attention(*self.qk_norm(self.qkv(h), ctx.rope), ctx.attn_mask))


class MMDiMBlock(SingleStreamBlock):
    """MM-DiM block (Fig. 2b): re-composition -> Mamba2 -> inverse, temporal branch in parallel, MLP.

    ``parallel_attention`` adds an attention branch beside the SSM (the Table 4 *Parallel* layout);
    the SSM, the temporal branch and the parallel attention share the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        ssm: dict,
        path: int,
        temporal_branch: bool = True,
        registers: bool = True,
        parallel_attention: bool = False,
    ) -> None:
        super().__init__(dim, mlp_hidden)
        self.path = path
        self.mamba = Mamba2Mixer(dim, **ssm)
        if (temporal_branch or parallel_attention) and self.mamba.d_inner != dim:
            raise ValueError("ssm_expand must be 1 when the temporal branch or parallel attention is used")
        if registers:
            self.registers = nn.Parameter(torch.randn(NUM_REGISTER_TYPES, dim) * 0.02)
        else:
            self.register_buffer("registers", torch.zeros(NUM_REGISTER_TYPES, dim), persistent=False)
        self.temporal = TemporalBranch(dim, num_heads) if temporal_branch else None
        if parallel_attention:
            self.qkv = nn.Linear(dim, 3 * dim)
            self.qk_norm = QKNorm(num_heads, dim // num_heads)
        self.parallel_attention = parallel_attention

    def mix(self, h: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        plan = ctx.plan(self.path)
        h_txt, h_vis = h.split([ctx.text_len, h.shape[1] - ctx.text_len], 1)  # backward: one cat, not two slices
        seq = plan.compose(h_txt, h_vis, self.registers)
        y_txt, y_vis = plan.invert(self.mamba.inner(seq, keep=plan.keep_mask()))
        if self.temporal is not None:
            y_vis = y_vis + self.temporal(h_vis, ctx.sizes)
        y = torch.cat([y_txt, y_vis], 1)
        if self.parallel_attention:
            y = y + attention(*self.qk_norm(self.qkv(h), ctx.rope), ctx.attn_mask)
        return self.mamba.out_proj(y)
