"""M4V (Wan2.1): Wan2.1's DiT with every self-attention replaced by an MM-DiM mixer (paper Sec. 4.1, 4.3).

Wan2.1's block is kept: a shared time projection to 6D plus a learned per-block modulation table
(shift/scale/gate for the mixer and the FFN), the mixer on the LayerNorm-ed, modulated video
tokens, cross-attention to the embedded text (Wan's text MLP) after an affine LayerNorm, and a
GELU-tanh FFN.  ``layout="attention"`` is plain Wan2.1 (3D-RoPE self-attention, the baseline);
``layout="mmdim"`` replaces the self-attention by the MM-DiM mixer of Sec. 3.3:

* MM-token re-composition: the SSM runs over ``[Z_l, r^0, x^0, ..., r^{T-1}, x^{T-1}, Z_r]`` where
  ``Z`` is a *text stream* that starts as Wan's embedded prompt (only its real tokens, left/right
  padded by the mask) and is updated by the mixer's text outputs in every block with the same gate
  as the video (Wan has no text stream of its own; without one, ``Z_r`` would have no effect).
  Cross-attention keeps attending to Wan's fixed text context, exactly as in Wan.
* Per-frame registers, 3 types.  All frames have the same resolution here, so the type encodes the
  frame's *position class* instead of its resolution: 0 for latent frame 0 (Wan's causal VAE
  encodes the first video frame alone; a single-frame image also gets type 0), 1 for the middle
  frames, 2 for the last frame (the one after which the scan returns to the text).
* Zigzag scans inside every frame, one of the 8 paths per layer, cycling over the layers.
* Temporal branch: every frame is at full resolution (K_s = 1), so each frame is one token of width
  ``S = D * H * W`` per head (optionally average-pooled by ``temporal_pool`` first, outputs
  nearest-upsampled back).  ``temporal_causal=True`` keeps the paper's causal attention over time;
  Wan denoises all frames together, so ``False`` (every frame sees every frame) is offered too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from m4v.layers.embeddings import MLPEmbedder, timestep_embedding
from m4v.layers.mamba2 import Mamba2Mixer
from m4v.layers.norms import RMSNorm
from m4v.layers.recomposition import NUM_REGISTER_TYPES, RecompositionPlan, TextArrangement, visual_indices
from m4v.layers.rope import apply_rope, rope_cos_sin
from m4v.layers.temporal_branch import TemporalBranch
from m4v.layers.zigzag import layer_path
from m4v.models.blocks import FeedForward
from m4v.models.loading import load_strict

FAMILY = "wan"
WAN_LAYOUTS = ("attention", "mmdim")


@dataclass
class M4VWanTransformerOutput(BaseOutput):
    """Velocity prediction for the whole video latent, [B, C_out, F, H, W]."""

    sample: torch.Tensor


def _check_config(c: dict[str, Any]) -> None:
    def bad(name: str, msg: str) -> None:
        raise ValueError(f"{name}: {msg}")

    if c["family"] != FAMILY:
        bad("family", f"must be {FAMILY!r} for M4VWanTransformer, got {c['family']!r}")
    if c["layout"] not in WAN_LAYOUTS:
        bad("layout", f"unknown layout {c['layout']!r}; choose one of {', '.join(WAN_LAYOUTS)}")
    ints = ("dim", "num_heads", "ffn_dim", "num_layers", "in_channels", "out_channels", "text_dim", "text_len",
            "freq_dim", "temporal_pool", "ssm_expand", "ssm_d_conv", "ssm_chunk_size")
    for name in ints:
        v = c[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            bad(name, f"must be a positive integer, got {v!r}")
    for name in ("ssm_d_state", "ssm_ngroups", "ssm_headdim"):
        v = c[name]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            bad(name, f"must be a positive integer or null, got {v!r}")
    for name in ("cross_attn_norm", "text_recomposition", "registers", "temporal_branch", "temporal_causal"):
        if not isinstance(c[name], bool):
            bad(name, f"must be true or false, got {c[name]!r}")
    p = c["patch_size"]
    if not isinstance(p, list | tuple) or len(p) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                                          for v in p):
        bad("patch_size", f"must be 3 positive integers (t, h, w), got {p!r}")
    if c["freq_dim"] % 2:
        bad("freq_dim", f"must be even (sin and cos halves), got {c['freq_dim']}")
    if c["dim"] % c["num_heads"]:
        bad("dim", f"{c['dim']} is not divisible by num_heads={c['num_heads']}")
    hd = c["dim"] // c["num_heads"]
    if hd % 2 or hd < 6:
        bad("num_heads", f"the head dim dim/num_heads = {hd} must be even and >= 6 (3D RoPE over t, h, w)")
    if not c["eps"] > 0:
        bad("eps", f"must be positive, got {c['eps']}")
    if not c["rope_theta"] > 0:
        bad("rope_theta", f"must be positive, got {c['rope_theta']}")
    if c["layout"] != "mmdim":
        return
    d_inner = c["ssm_expand"] * c["dim"]
    headdim = c["ssm_headdim"] or math.gcd(64, hd)
    if d_inner % headdim:
        bad("ssm_headdim", f"{headdim} does not divide ssm_expand * dim = {d_inner}")
    nheads = d_inner // headdim
    groups = c["ssm_ngroups"] or c["num_heads"]
    if nheads % groups:
        bad("ssm_ngroups", f"{groups} SSM groups must divide the {nheads} SSM heads (ssm_expand * dim / ssm_headdim)")
    if c["temporal_branch"] and c["ssm_expand"] != 1:
        bad("ssm_expand", "must be 1 with the temporal branch (it shares the SSM's out_proj)")


def ssm_kwargs(config: Any) -> dict[str, int]:
    """Mamba2Mixer arguments; defaults: one SSM group per attention head, d_state = head dim, SSM head dim
    gcd(64, head dim) (so every SSM head lies inside one attention head)."""
    c = dict(config)
    head_dim = c["dim"] // c["num_heads"]
    return dict(
        d_state=c["ssm_d_state"] or head_dim,
        d_conv=c["ssm_d_conv"],
        expand=c["ssm_expand"],
        headdim=c["ssm_headdim"] or math.gcd(64, head_dim),
        ngroups=c["ssm_ngroups"] or c["num_heads"],
        chunk_size=c["ssm_chunk_size"],
    )


def wan_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of the head dim over (t, h, w): h = w = 2 * (head_dim // 6), t takes the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def wan_register_types(num_frames: int) -> list[int]:
    """Register type of each latent frame: 0 first (image-like) frame, 1 middle frames, 2 last frame."""
    if num_frames < 1:
        return []
    if num_frames == 1:
        return [0]
    return [0] + [1] * (num_frames - 2) + [2]


def wan_visual_indices(
    grid: tuple[int, int, int], path: int, registers: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual gather indices for T equal frames (shared cache of m4v.layers.recomposition), Wan register types."""
    T, H, W = (int(v) for v in grid)
    return visual_indices([(H, W)] * T, path, registers, device, types=wan_register_types(T))


@dataclass
class WanSequenceContext:
    """Token layout of one forward pass: text-stream mask, latent token grid (T, H, W), cached plans and RoPE."""

    text_mask: torch.Tensor  # [B, L] bool, True = real token of the mixer's text stream
    grid: tuple[int, int, int]
    head_dim: int
    rope_theta: float = 10000.0
    recompose_text: bool = True
    registers: bool = True
    _cache: dict = field(default_factory=dict)

    def plan(self, path: int) -> RecompositionPlan:
        key = ("plan", path)
        if key not in self._cache:
            if "text" not in self._cache:
                self._cache["text"] = TextArrangement.from_mask(self.text_mask)
            index, inverse = wan_visual_indices(self.grid, path, self.registers, self.text_mask.device)
            self._cache[key] = RecompositionPlan(
                self._cache["text"], self.text_mask.shape[1], index, inverse, self.recompose_text
            )
        return self._cache[key]

    @property
    def rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T*H*W, head_dim/2] of Wan's 3D RoPE over the (frame, row, column) token positions."""
        if "rope" not in self._cache:
            T, H, W = self.grid
            axes = [torch.arange(n, dtype=torch.float64) for n in (T, H, W)]
            pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
            cos, sin = rope_cos_sin(pos, wan_rope_axes(self.head_dim), self.rope_theta)
            self._cache["rope"] = (cos.to(self.text_mask.device), sin.to(self.text_mask.device))
        return self._cache["rope"]

    @torch.compiler.disable
    def prepare(self, paths: set[int], attention: bool) -> None:
        """Build the index plans (or the RoPE table) before the blocks run: one graph break."""
        for path in paths:
            self.plan(path)
        if attention:
            _ = self.rope


def fp32_layer_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm computed in float32 (Wan's FP32LayerNorm); returns float32."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps)


class TextProjection(nn.Module):
    """Wan's text MLP: Linear(text_dim, D) -> GELU(tanh) -> Linear(D, D)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class WanAttention(nn.Module):
    """Wan's attention: biased q/k/v/o projections, RMSNorm on q and k across all heads, optional 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        kv = x if context is None else context
        q, k, v = self.norm_q(self.to_q(x)), self.norm_k(self.to_k(kv)), self.to_v(kv)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(o.transpose(1, 2).flatten(2))


class WanTemporalBranch(TemporalBranch):
    """Temporal branch over whole-video frames (Sec. 3.3 read for Wan): each frame is one token of width D*H*W.

    Same parameters as ``TemporalBranch``; with ``causal=True`` and ``pool=1`` it computes what
    ``TemporalBranch`` computes on T equal-size frames (K_s = 1).  ``pool`` > 1 averages p x p token
    blocks before the projections and repeats the outputs over each block.
    """

    def __init__(self, dim: int, num_heads: int, causal: bool = True, pool: int = 1) -> None:
        super().__init__(dim, num_heads)
        self.causal, self.pool = causal, pool

    def forward(self, h: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:  # type: ignore[override]
        """h [B, T*H*W, D] video tokens in (frame, row, column) order -> [B, T*H*W, D]."""
        B, _, D = h.shape
        T, H, W = grid
        p = self.pool
        if H % p or W % p:
            raise ValueError(f"temporal_pool: {p} does not divide the latent token grid {H}x{W}")
        x = h.reshape(B, T, H, W, D)
        if p > 1:
            x = x.reshape(B, T, H // p, p, W // p, p, D).float().mean((3, 5)).to(h.dtype)
        hp, wp = H // p, W // p
        q, k, v = self.qkv(x.reshape(B, T, hp * wp, D)).unflatten(-1, (3, self.num_heads, -1)).unbind(-3)
        q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (t.permute(0, 3, 1, 2, 4).flatten(-2) for t in (q, k, v))  # [B, heads, T, P*hd]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        o = o.unflatten(-1, (hp * wp, -1)).permute(0, 2, 3, 1, 4).flatten(-2)  # [B, T, P, D]
        o = o.reshape(B, T, hp, 1, wp, 1, D).expand(B, T, hp, p, wp, p, D)
        return o.reshape(B, T * H * W, D)


class WanMMDiMMixer(nn.Module):
    """MM-DiM mixer in place of Wan's self-attention (Fig. 2b): re-composition -> Mamba2 -> inverse, temporal branch.

    The SSM, the temporal branch and the output bias share ``mamba.out_proj`` (the bias takes Wan's
    attention output bias on conversion).  Returns (video, text-stream) outputs.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ssm: dict[str, int],
        path: int,
        registers: bool = True,
        temporal_branch: bool = True,
        temporal_causal: bool = True,
        temporal_pool: int = 1,
    ) -> None:
        super().__init__()
        self.path = path
        self.mamba = Mamba2Mixer(dim, **ssm)
        if registers:
            self.registers = nn.Parameter(torch.randn(NUM_REGISTER_TYPES, dim) * 0.02)
        else:
            self.register_buffer("registers", torch.zeros(NUM_REGISTER_TYPES, dim), persistent=False)
        self.temporal = WanTemporalBranch(dim, num_heads, temporal_causal, temporal_pool) if temporal_branch else None
        self.out_bias = nn.Parameter(torch.zeros(dim))

    def forward(
        self, vis: torch.Tensor, txt: torch.Tensor, ctx: WanSequenceContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = ctx.plan(self.path)
        seq = plan.compose(txt, vis, self.registers)
        y_txt, y_vis = plan.invert(self.mamba.inner(seq, keep=plan.keep_mask()))
        if self.temporal is not None:
            y_vis = y_vis + self.temporal(vis, ctx.grid)
        L = txt.shape[1]
        y = self.mamba.out_proj(torch.cat([y_txt, y_vis], 1)) + self.out_bias.to(vis.dtype)
        return y[:, L:], y[:, :L]


def build_mixer(config: Any, layer_index: int) -> nn.Module:
    """The mixer of block ``layer_index``: Wan's self-attention or the MM-DiM mixer (zigzag path = index % 8)."""
    c = dict(config)
    if c["layout"] == "attention":
        return WanAttention(c["dim"], c["num_heads"], c["eps"])
    return WanMMDiMMixer(
        c["dim"],
        c["num_heads"],
        ssm_kwargs(c),
        path=layer_path(layer_index),
        registers=c["registers"],
        temporal_branch=c["temporal_branch"],
        temporal_causal=c["temporal_causal"],
        temporal_pool=c["temporal_pool"],
    )


class WanBlock(nn.Module):
    """Wan2.1 block: modulated mixer, cross-attention to the text context, modulated FFN; gates from a 6D table."""

    def __init__(
        self, dim: int, num_heads: int, ffn_dim: int, eps: float, cross_attn_norm: bool, mixer: nn.Module
    ) -> None:
        super().__init__()
        self.eps = eps
        self.mixer = mixer
        self.cross_attn = WanAttention(dim, num_heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps) if cross_attn_norm else None
        self.ffn = FeedForward(dim, ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        txt: torch.Tensor,
        context: torch.Tensor,
        e: torch.Tensor,
        ctx: WanSequenceContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, D] video, txt [B, L, D] text stream, context [B, text_len, D], e [B, 6, D] time projection."""
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table.float() + e).chunk(6, dim=1)
        h = (fp32_layer_norm(x, self.eps) * (1 + scale) + shift).to(x.dtype)
        if isinstance(self.mixer, WanMMDiMMixer):
            ht = (fp32_layer_norm(txt, self.eps) * (1 + scale) + shift).to(txt.dtype)
            y, y_txt = self.mixer(h, ht, ctx)
            txt = (txt.float() + y_txt.float() * gate).to(txt.dtype)
        else:
            y = self.mixer(h, rope=ctx.rope)
        x = (x.float() + y.float() * gate).to(x.dtype)
        if self.norm2 is not None:
            n2 = fp32_layer_norm(x, self.eps, self.norm2.weight, self.norm2.bias).to(x.dtype)
        else:
            n2 = x
        x = x + self.cross_attn(n2, context)
        h = (fp32_layer_norm(x, self.eps) * (1 + c_scale) + c_shift).to(x.dtype)
        x = (x.float() + self.ffn(h).float() * c_gate).to(x.dtype)
        return x, txt


class M4VWanTransformer(ModelMixin, ConfigMixin):
    """M4V (Wan2.1) backbone: Wan2.1's DiT with MM-DiM mixers (or plain self-attention), whole video at once."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> Any:  # type: ignore[override]
        """diffusers ``from_pretrained`` from a local folder, strict: the folder must hold this class with every
        weight (``m4v.models.loading``); nothing is downloaded."""
        load = super().from_pretrained
        return load_strict(load, cls.__name__, pretrained_model_name_or_path, **kwargs)

    _supports_gradient_checkpointing = True
    _no_split_modules = ["WanBlock"]

    @register_to_config
    def __init__(
        self,
        family: str = FAMILY,
        layout: str = "mmdim",
        patch_size: Sequence[int] = (1, 2, 2),
        in_channels: int = 16,
        out_channels: int = 16,
        dim: int = 1536,
        num_heads: int = 12,
        ffn_dim: int = 8960,
        num_layers: int = 30,
        text_dim: int = 4096,
        text_len: int = 512,
        freq_dim: int = 256,
        eps: float = 1e-6,
        cross_attn_norm: bool = True,
        rope_theta: float = 10000.0,
        text_recomposition: bool = True,
        registers: bool = True,
        temporal_branch: bool = True,
        temporal_causal: bool = True,
        temporal_pool: int = 1,
        ssm_d_state: int | None = None,
        ssm_ngroups: int | None = None,
        ssm_headdim: int | None = None,
        ssm_expand: int = 1,
        ssm_d_conv: int = 4,
        ssm_chunk_size: int = 256,
    ) -> None:
        super().__init__()
        _check_config(dict(self.config))
        self.gradient_checkpointing = False
        D, p = dim, tuple(int(v) for v in patch_size)
        self.patch_embedding = nn.Conv3d(in_channels, D, kernel_size=p, stride=p)
        self.time_embedder = MLPEmbedder(freq_dim, D)
        self.time_proj = nn.Linear(D, 6 * D)
        self.text_embedder = TextProjection(text_dim, D)
        self.blocks = nn.ModuleList(
            WanBlock(D, num_heads, ffn_dim, eps, cross_attn_norm, build_mixer(self.config, i))
            for i in range(num_layers)
        )
        self.proj_out = nn.Linear(D, out_channels * math.prod(p))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, D) / D**0.5)
        self._paths = {b.mixer.path for b in self.blocks if isinstance(b.mixer, WanMMDiMMixer)}

    def _check_inputs(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None) -> None:
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.in_channels:
            raise ValueError(
                f"hidden_states: expected a [B, {c.in_channels}, F, H, W] video latent, got {tuple(x.shape)}"
            )
        if any(s % q for s, q in zip(x.shape[2:], c.patch_size)):
            raise ValueError(f"patch_size: {list(c.patch_size)} does not divide the latent size {tuple(x.shape[2:])}")
        if text.ndim != 3 or text.shape[0] != x.shape[0] or text.shape[2] != c.text_dim:
            raise ValueError(
                f"encoder_hidden_states: expected [B={x.shape[0]}, L, {c.text_dim}], got {tuple(text.shape)}"
            )
        if text.shape[1] > c.text_len:
            raise ValueError(f"encoder_hidden_states: {text.shape[1]} text tokens exceed text_len={c.text_len}")
        if mask is not None and tuple(mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"encoder_attention_mask: expected shape {tuple(text.shape[:2])}, got {tuple(mask.shape)}")

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> M4VWanTransformerOutput | tuple[torch.Tensor]:
        """Velocity of the whole noisy video latent.

        hidden_states [B, C, F, H, W]; timestep [B] (or scalar) in [0, 1000]; encoder_hidden_states
        [B, L, text_dim] text token states with encoder_attention_mask [B, L] (True = real token).
        As in Wan, the states are zeroed at padding and zero-padded to ``text_len`` tokens for
        cross-attention; the MM-DiM text stream holds only the real tokens.
        """
        c = self.config
        self._check_inputs(hidden_states, encoder_hidden_states, encoder_attention_mask)
        B, _, Fr, H, W = hidden_states.shape
        pt, ph, pw = c.patch_size
        grid = (Fr // pt, H // ph, W // pw)
        L = encoder_hidden_states.shape[1]
        if encoder_attention_mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=hidden_states.device)
        else:
            mask = encoder_attention_mask.bool()
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(hidden_states.to(dtype)).flatten(2).transpose(1, 2)
        temb = self.time_embedder(timestep_embedding(timestep, c.freq_dim).to(dtype))
        e = self.time_proj(F.silu(temb)).float().unflatten(1, (6, -1))
        states = encoder_hidden_states.to(dtype) * mask[..., None].to(dtype)
        context = self.text_embedder(F.pad(states, (0, 0, 0, c.text_len - L)))
        txt = context[:, :L]
        ctx = WanSequenceContext(mask, grid, c.dim // c.num_heads, c.rope_theta, c.text_recomposition, c.registers)
        ctx.prepare(self._paths, c.layout == "attention")
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, txt = self._gradient_checkpointing_func(block, x, txt, context, e, ctx)
            else:
                x, txt = block(x, txt, context, e, ctx)
        shift, scale = (self.scale_shift_table.float() + temb.float()[:, None]).chunk(2, dim=1)
        x = (fp32_layer_norm(x, c.eps) * (1 + scale) + shift).to(dtype)
        out = self.proj_out(x)
        T, Hh, Ww = grid
        out = out.reshape(B, T, Hh, Ww, pt, ph, pw, c.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, c.out_channels, Fr, H, W).to(hidden_states.dtype)
        return M4VWanTransformerOutput(sample=out) if return_dict else (out,)


__all__ = [
    "FAMILY",
    "WAN_LAYOUTS",
    "M4VWanTransformer",
    "M4VWanTransformerOutput",
    "WanAttention",
    "WanBlock",
    "WanMMDiMMixer",
    "WanSequenceContext",
    "WanTemporalBranch",
    "build_mixer",
    "ssm_kwargs",
    "wan_register_types",
    "wan_rope_axes",
    "wan_visual_indices",
]
