"""Temporal branch of the MM-DiM block: causal attention over compressed frames (paper Sec. 3.3).

How we read K_s and S.  The paper downsamples every conditioning frame to the smallest spatial
resolution of the sequence, ``H/K_s x W/K_s``, folds space into channels (``S = c * H/K_s * W/K_s``)
and splits the current frame "into K_s tokens of width S".  A frame of ``H x W`` positions holds
``K_s^2`` blocks of ``H/K_s x W/K_s`` positions, so we read K_s as the *linear* downsampling factor
(4 at the last pyramid stage, 2 at the middle one, 1 at the first) and split the current frame into
``K_s^2`` tokens.  The split is space-to-depth (token (a, b) takes positions (a::K_s, b::K_s)):
every current-frame token is then a low-resolution view of the whole frame whose slot (i, j) is the
same place in space as slot (i, j) of a compressed history frame, so the folded vectors are
comparable by a dot product.  ``c`` is the model width; q/k/v are projected per position before
folding (average pooling commutes with the projection, so history frames are pooled first).  The
attention is causal in time: a history frame sees itself and earlier frames, the current frame's
tokens see all history and each other.  Outputs of the current frame are unfolded back to full
size; outputs of a history frame are nearest-upsampled to its own size.  The result, of width
``dim``, is added to the mixer output before the block's output projection (the residual of Fig. 2b).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from m4v.layers.norms import RMSNorm
from m4v.ops.fused import fold_heads
from m4v.ops.norm import upcast


def _runs(sizes: Sequence[tuple[int, int]]) -> list[tuple[tuple[int, int], int]]:
    """Consecutive equal sizes as (size, count) runs."""
    runs: list[tuple[tuple[int, int], int]] = []
    for s in sizes:
        if runs and runs[-1][0] == tuple(s):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((tuple(s), 1))
    return runs


def folded_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_history: int) -> torch.Tensor:
    """Softmax attention over a handful of very wide tokens (explicit: no fused kernel takes such head dims)."""
    T = q.shape[-2]
    scores = upcast(torch.matmul(q, k.transpose(-1, -2))) * q.shape[-1] ** -0.5
    mask = temporal_causal_mask(num_history, T - num_history, q.device)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.matmul(probs.to(v.dtype), v)


def temporal_causal_mask(num_history: int, num_current: int, device: torch.device) -> torch.Tensor:
    """[T, T] bool mask (True = attend) over [history frames..., current tokens...]."""
    T = num_history + num_current
    frame = torch.arange(T, device=device).clamp(max=num_history)
    return frame[None, :] <= frame[:, None]


class TemporalBranch(nn.Module):
    """Lightweight causal attention along time over frames compressed to the smallest resolution."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = RMSNorm(dim // num_heads)
        self.norm_k = RMSNorm(dim // num_heads)

    def forward(self, h: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """h [B, Nv, D] visual tokens of frames with token grids ``sizes`` (time order, current last)."""
        if len(sizes) == 1:
            # No history: the current frame is one folded token (K_s = 1) that attends only to itself, the
            # softmax over one key is exactly 1, and the output is its value projection (the first frame).
            D = self.dim
            out = F.linear(h, self.qkv.weight[2 * D :], None if self.qkv.bias is None else self.qkv.bias[2 * D :])
            if torch.is_grad_enabled():
                # The folded path gives the q/k norm weights an exact zero gradient. Keep them in the graph so
                # that the optimizer treats them as before (Adam state, step count, weight decay) and
                # checkpoints hold optimizer state for every parameter after image-only steps.
                out = out + 0.0 * (self.norm_q.weight.sum() + self.norm_k.weight.sum())
            return out
        return self.folded(h, sizes)

    def folded(self, h: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The branch as written above (pool, fold, causal attention over time, unfold), for any ``sizes``.

        Written for few passes over memory: the folded tokens are assembled in one buffer straight from strided
        views of ``h`` (block means for pooling), q/k/v come out of one fused op in the attention's layout, and
        the output is written once, frame by frame, from views of the attention output (nearest upsampling is a
        broadcast).
        """
        B, Nv, D = h.shape
        H, W = sizes[-1]
        hs = min(s[0] for s in sizes)
        ws = min(s[1] for s in sizes)
        K = H // hs
        if H % hs or W % ws or W // ws != K:
            raise ValueError(f"TemporalBranch: frame grids {list(sizes)} are not a pyramid of the current frame")
        groups = _runs(sizes[:-1])  # consecutive history frames of one size are handled together
        nh, heads = len(sizes) - 1, self.num_heads
        T = nh + K * K
        tokens = h.new_empty(B, T, hs, ws, D)
        # one split of h, not slices: its backward is one concatenation (a slice's is a zero-filled copy of all of h)
        *history, current = h.split([count * a * b for (a, b), count in groups] + [H * W], 1)
        t0 = 0
        for ((a, b), count), src in zip(groups, history):
            dst = tokens[:, t0 : t0 + count]
            if a % hs or b % ws:  # not a whole-block pyramid level: adaptive pooling
                dst.copy_(self._pool(src.reshape(B * count, a * b, D), (a, b), (hs, ws)).view(B, count, hs, ws, D))
            elif (a, b) == (hs, ws):
                dst.copy_(src.view(B, count, hs, ws, D))
            else:
                blocks = src.view(B, count, hs, a // hs, ws, b // ws, D)
                dst.copy_(blocks.mean(dim=(3, 5), dtype=upcast(blocks[:0]).dtype))  # float32 sums for half inputs
            t0 += count
        # current frame: token (i, j) takes positions (i::K, j::K)
        tokens[:, nh:].view(B, K, K, hs, ws, D).copy_(current.view(B, hs, K, ws, K, D).permute(0, 2, 4, 1, 3, 5))
        qkv = self.qkv(tokens).flatten(2, 3)  # [B, T, P, 3D]
        q, k, v = fold_heads(qkv, self.norm_q.weight, self.norm_k.weight, heads, self.norm_q.eps)
        o = folded_causal_attention(q, k, v, nh).view(B, heads, T, hs, ws, D // heads)
        out = h.new_empty(B, Nv, heads, D // heads)
        off, t0 = 0, 0
        for (a, b), count in groups:
            src = o[:, :, t0 : t0 + count].permute(0, 2, 3, 4, 1, 5)  # [B, count, hs, ws, heads, hd]
            dst = out[:, off : off + count * a * b]
            if a % hs or b % ws:
                up = self._unpool(src.reshape(B * count, hs * ws, D), (hs, ws), (a, b))
                dst.copy_(up.view(B, count * a * b, heads, D // heads))
            else:
                dst.view(B, count, hs, a // hs, ws, b // ws, heads, D // heads).copy_(src[:, :, :, None, :, None])
            off, t0 = off + count * a * b, t0 + count
        cur = o[:, :, nh:].view(B, heads, K, K, hs, ws, D // heads).permute(0, 4, 2, 5, 3, 1, 6)
        out[:, off:].view(B, hs, K, ws, K, heads, D // heads).copy_(cur)
        return out.view(B, Nv, D)

    @staticmethod
    def _pool(x: torch.Tensor, size: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
        B, _, D = x.shape
        img = x.transpose(1, 2).reshape(B, D, *size)
        if size != target:
            img = F.adaptive_avg_pool2d(upcast(img), target).to(x.dtype)
        return img.flatten(2).transpose(1, 2)

    @staticmethod
    def _unpool(x: torch.Tensor, size: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
        B, _, D = x.shape
        img = x.transpose(1, 2).reshape(B, D, *size)
        if size != target:
            img = F.interpolate(img, size=target, mode="nearest")
        return img.flatten(2).transpose(1, 2)
