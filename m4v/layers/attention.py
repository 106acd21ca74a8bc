"""Joint attention with RMSNorm q/k, 3D RoPE and the temporal-causal mask (PyramidFlow, paper Sec. 3.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m4v.layers.norms import RMSNorm
from m4v.layers.rope import apply_rope


def frame_causal_mask(frame_ids: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Boolean attention mask [B, 1, N, N] (True = attend) for tokens tagged with frame ids [N].

    Text tokens carry frame id -1; a query of frame f sees keys of frames <= f (so text sees only
    text, and no frame sees a later one).  ``key_valid`` [B, N] masks out padded text keys; every
    query keeps at least itself so padded rows stay finite.
    """
    allowed = frame_ids[None, :] <= frame_ids[:, None]
    mask = allowed[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
        eye = torch.eye(frame_ids.numel(), dtype=torch.bool, device=frame_ids.device)
        mask = mask | eye[None, None]
    return mask


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Scaled dot-product attention on [B, heads, N, d] tensors; returns [B, N, heads * d]."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class QKNorm(nn.Module):
    """Split a fused qkv projection into heads and RMS-normalise q and k."""

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)

    def forward(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        return self.norm_q(q), self.norm_k(k), v


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention after rotating q and k by the 3D RoPE tables."""
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return attention(q, k, v, mask)
