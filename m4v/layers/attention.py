"""Joint attention with RMSNorm q/k, 3D RoPE and the temporal-causal mask (PyramidFlow, paper Sec. 3.1)."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention

from m4v.layers.norms import RMSNorm
from m4v.ops.fused import qkv_heads

ATTENTION_BACKENDS = ("sdpa", "flex")
FLEX_BLOCK_SIZE = 128  # FlexAttention's default sparse block (torch 2.13's compiled CPU kernel is wrong at 8)

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_backend(name: str | None = None) -> str:
    """The attention backend: ``name``, or when None the ``M4V_ATTENTION`` environment variable (default sdpa)."""
    if name is None:
        name = os.environ.get("M4V_ATTENTION") or "sdpa"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"M4V_ATTENTION must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}.")
    return name


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


def frame_causal_mask_mod(frame_ids: torch.Tensor, key_valid: torch.Tensor | None) -> MaskMod:
    """FlexAttention ``mask_mod(b, h, q, kv)`` with exactly the semantics of :func:`frame_causal_mask`."""
    if key_valid is None:  # the diagonal is allowed anyway (a token's frame id equals its own)

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return frame_ids[kv] <= frame_ids[q]

    else:

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return ((frame_ids[kv] <= frame_ids[q]) & key_valid[b, kv]) | (q == kv)

    return mask_mod


def _tiles(x: torch.Tensor, fill: int | bool, block: int) -> torch.Tensor:
    """[..., N] -> [..., ceil(N / block), block], the tail padded with ``fill``."""
    pad = -x.shape[-1] % block
    x = torch.cat([x, x.new_full((*x.shape[:-1], pad), fill)], -1)
    return x.unflatten(-1, (-1, block))


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense block flags [B, QB, KB] -> per-row counts [B, 1, QB] and indices [B, 1, QB, KB] (set blocks first)."""
    counts = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort((~blocks).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


def frame_causal_block_mask(
    frame_ids: torch.Tensor, key_valid: torch.Tensor | None, block_size: int = FLEX_BLOCK_SIZE
) -> BlockMask:
    """FlexAttention BlockMask of :func:`frame_causal_mask` built from per-block bounds, never the N x N mask.

    Needs ``frame_ids`` non-decreasing only for sparsity, not for correctness: a (query block, key block)
    tile is kept when some valid key's frame id is <= some query's (or it holds the diagonal), and is
    "full" (mask_mod skipped) when every key is valid and no key's frame id exceeds any query's.
    Tiles that stick out of the sequence are never full, as in ``create_block_mask``.
    """
    n, dev = frame_ids.numel(), frame_ids.device
    ids = frame_ids.long()
    lo, hi = torch.iinfo(torch.long).min, torch.iinfo(torch.long).max
    valid = key_valid if key_valid is not None else torch.ones(1, n, dtype=torch.bool, device=dev)
    q_max, q_min = _tiles(ids, lo, block_size).amax(-1), _tiles(ids, hi, block_size).amin(-1)  # [QB]
    inside = _tiles(torch.ones(n, dtype=torch.bool, device=dev), False, block_size).all(-1)  # [QB]
    k_min_valid = _tiles(torch.where(valid, ids, hi), hi, block_size).amin(-1)  # [B, KB]
    k_max = _tiles(ids, hi, block_size).amax(-1)  # [KB]
    k_all_valid = _tiles(valid, False, block_size).all(-1)  # [B, KB]
    diagonal = torch.eye(q_max.numel(), dtype=torch.bool, device=dev)
    any_kept = (k_min_valid[:, None, :] <= q_max[None, :, None]) | diagonal
    full = k_all_valid[:, None, :] & (inside[:, None] & (k_max[None, :] <= q_min[:, None]))
    partial = any_kept & ~full
    return BlockMask.from_kv_blocks(
        *_ordered(partial),
        *_ordered(full),
        BLOCK_SIZE=block_size,
        mask_mod=frame_causal_mask_mod(frame_ids, key_valid),
        seq_lengths=(n, n),
    )


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """``torch.compile(flex_attention)``: the fused kernel (eager flex_attention is a slow reference)."""
    return torch.compile(flex_attention)


@torch.compiler.disable  # off CUDA, also inside compiled blocks (torch 2.13's CPU flex lowering breaks on RoPE'd q)
def _flex_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask) -> torch.Tensor:
    """FlexAttention off CUDA: eager (compiling it for CPU is slow and rejects float64), no backward in torch."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # FlexAttention has no backward off CUDA (torch 2.13): evaluate the mask_mod densely instead
        dense = create_mask(mask.mask_mod, mask.kv_num_blocks.shape[0], 1, *mask.seq_lengths, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=mask)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask) -> torch.Tensor:
    if q.device.type != "cuda":
        return _flex_eager(q, k, v, mask)
    if torch.compiler.is_compiling():  # inside a compiled block: inductor fuses it there
        return flex_attention(q, k, v, block_mask=mask)
    return _compiled_flex_attention()(q, k, v, block_mask=mask)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None) -> torch.Tensor:
    """Scaled dot-product attention on [B, heads, N, d] tensors; returns [B, N, heads * d].

    A boolean tensor mask (or None) runs ``F.scaled_dot_product_attention``; a BlockMask runs FlexAttention.
    """
    if isinstance(mask, BlockMask):
        out = _flex(q, k, v, mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class QKNorm(nn.Module):
    """RMSNorm weights of q and k (one per head dim) for a fused qkv projection; see :func:`qkv_heads`."""

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)

    def forward(
        self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, heads, N, d] from qkv [B, N, 3 * heads * d]: q and k RMS-normalised, then RoPE-rotated."""
        return joint_qkv([qkv], [self], rope)


def joint_qkv(
    qkvs: Sequence[torch.Tensor], norms: Sequence[QKNorm], rope: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heads of consecutive sequence segments (e.g. MM-DiT's text and video streams), each with its own q/k norm.

    One fused op (m4v.ops.fused.qkv_heads): split heads, RMSNorm q and k, join the segments, rotate by RoPE.
    """
    cos, sin = rope if rope is not None else (None, None)
    return qkv_heads(
        list(qkvs),
        [n.norm_q.weight for n in norms],
        [n.norm_k.weight for n in norms],
        norms[0].num_heads,
        norms[0].norm_q.eps,
        cos,
        sin,
    )
