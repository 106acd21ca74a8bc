"""Fused element-wise ops of the backbone blocks (issue 5, layer overheads): q/k RMSNorm + 3D RoPE, adaLN.

A profile of generation showed these chains of small element-wise kernels (upcast, square, mean, rsqrt,
scale, cast; rotate pairs; LayerNorm then ``x * (1 + scale) + shift``; ``x + gate * (a + b)``) moving more
bytes than the matrix products around them. Each op here is written once in torch (the reference and the
CPU path, float32 math for half inputs as the layers always did); on CUDA the same function is compiled once
with dynamic shapes (``torch.compile(dynamic=True)``: one generated kernel per op for every sequence length,
forward and backward), unless ``M4V_FUSED=0``, ``M4V_DISABLE_TRITON=1`` or an outer ``torch.compile`` is tracing
(which then fuses the reference itself). Small tensors (main input below the op's ``FUSED_MIN_NUMEL`` elements,
env override ``M4V_FUSED_MIN_NUMEL``, 0: always compiled) run the torch ops eagerly: there the compiled call's
host overhead (dynamo guards, autograd wrappers) exceeds the time of the few small kernels it replaces (measured by
benchmarks/bench_fused_ops.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from m4v.ops.norm import upcast


def _rms_float(xf: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``xf / rms(xf) * weight`` over the last dimension, in xf's (float) dtype."""
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dimension, float32 math for half inputs, output in x's dtype."""
    return _rms_float(upcast(x), weight, eps).to(x.dtype)


def _rotate(xf: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of xf [B, N, H, d] by angles with tables [N, d / 2]."""
    x0, x1 = xf.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos.to(xf.dtype)[:, None], sin.to(xf.dtype)[:, None]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)


def qkv_heads_ref(
    qkvs: Sequence[torch.Tensor],
    q_weights: Sequence[torch.Tensor],
    k_weights: Sequence[torch.Tensor],
    num_heads: int,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, heads, N, d] from fused projections: RMSNorm of q and k, then the RoPE rotation.

    ``qkvs`` are consecutive segments of the sequence, each [B, N_i, 3 * heads * d] (the text and the video
    stream of an MM-DiT block, or one sequence), each normalised with its own weights and joined along N.
    ``cos``/``sin`` [sum N_i, d / 2] (None: no rotation). The results are [B, N, heads, d] in memory (the
    layout of the projection), so the attention output comes back in [B, N, heads * d] order.
    """
    qs, ks, vs = [], [], []
    for qkv, wq, wk in zip(qkvs, q_weights, k_weights):
        q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).unbind(2)  # [B, N_i, heads, d]
        qs.append(_rms_float(upcast(q), wq, eps))  # rotated before the one cast back
        ks.append(_rms_float(upcast(k), wk, eps))
        vs.append(v)
    q, k, v = (t[0] if len(t) == 1 else torch.cat(t, 1) for t in (qs, ks, vs))
    if cos is not None:
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    dtype = qkvs[0].dtype
    return q.to(dtype).transpose(1, 2), k.to(dtype).transpose(1, 2), v.transpose(1, 2)


def fold_heads_ref(
    qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, num_heads: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Folded tokens of the temporal branch: qkv [B, T, P, 3 * heads * d] -> q, k, v [B, heads, T, P * d].

    q and k RMS-normalised per head over d (at every one of the P positions a token folds), output in qkv's dtype.
    """
    B, T, P, _ = qkv.shape
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).unbind(-3)  # [B, T, P, heads, d]
    q, k = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    return tuple(t.permute(0, 3, 1, 2, 4).reshape(B, num_heads, T, -1) for t in (q, k, v))  # type: ignore[return-value]


def ln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """adaLN: ``LayerNorm(x) * (1 + scale) + shift`` (no affine LayerNorm, float32 norm), per-sample [B, D]."""
    h = F.layer_norm(upcast(x), x.shape[-1:], eps=eps).to(x.dtype)
    return h * (1 + scale[:, None]) + shift[:, None]


def gated_residual_ref(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, y2: torch.Tensor | None = None
) -> torch.Tensor:
    """adaLN-Zero residual ``x + gate * y`` (``x + gate * (y + y2)`` with a second branch), gate [B, D]."""
    if y2 is not None:
        y = y + y2
    return x + gate[:, None] * y


COMPILE_BACKEND = "inductor"  # tests trace the same way with "aot_eager" (no code generation) on the CPU

FUSED_MIN_NUMEL: dict[str, int] = {
    "qkv_heads": 1 << 20,  # one shape alone: compiled faster from 295k elements; a whole small-model generation
    "fold_heads": 1 << 20,  # (all calls < 1M) ran faster with both eager (docs/performance.md): 1M
    "rms_norm": 1 << 23,  # forward faster compiled from 6.3M, forward+backward from 15.7M
    "ln_modulate": 1 << 23,  # forward from 7.9M, forward+backward only at 63M
    "gated_residual": 1 << 24,  # forward from 15.7M, forward+backward only at 63M
}
"""Per op, the elements of its main input (the segments of a list summed) from which it runs compiled on CUDA; below,
the eager torch ops, whose few small kernels cost less host time than a compiled call (one H100,
``benchmarks/bench_fused_ops.py``, ``benchmarks/results/fused_ops_h100.json``, and the shipped model's pipeline).
Env ``M4V_FUSED_MIN_NUMEL`` sets one threshold for every op (0: always compiled)."""


@functools.cache
def _compiled(fn: Callable, backend: str) -> Callable:
    return torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)


def _min_numel(op: str) -> int:
    """FUSED_MIN_NUMEL[op], or the non-negative integer in M4V_FUSED_MIN_NUMEL when that is set (and not empty)."""
    raw = os.environ.get("M4V_FUSED_MIN_NUMEL", "").strip()
    if not raw:
        return FUSED_MIN_NUMEL[op]
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"M4V_FUSED_MIN_NUMEL must be a non-negative integer (0: always compiled), got {raw!r}")
    return value


def _compiled_wanted(op: str, is_cuda: bool, numel: int) -> bool:
    """Whether ``op`` on a main input of ``numel`` elements runs compiled (outside an outer compile): on CUDA, from
    its threshold up (FUSED_MIN_NUMEL or M4V_FUSED_MIN_NUMEL), unless M4V_FUSED=0 or M4V_DISABLE_TRITON=1."""
    threshold = _min_numel(op)  # a bad M4V_FUSED_MIN_NUMEL is reported on every device
    if not is_cuda or os.environ.get("M4V_DISABLE_TRITON", "0") == "1" or os.environ.get("M4V_FUSED", "1") == "0":
        return False
    return numel >= threshold


def use_compiled(x: torch.Tensor | Sequence[torch.Tensor], op: str) -> bool:
    """The compiled kernels of ``op`` for CUDA tensors of at least FUSED_MIN_NUMEL[op] elements (the segments of a list
    summed), unless M4V_FUSED=0, M4V_DISABLE_TRITON=1 or an outer compile traces. Smaller tensors run the torch ops
    eagerly: the compiled call's host overhead exceeds the small kernels' time (benchmarks/bench_fused_ops.py)."""
    if torch.compiler.is_compiling():  # the outer compile fuses the reference itself
        return False
    parts = list(x) if isinstance(x, (list, tuple)) else [x]
    return _compiled_wanted(op, parts[0].is_cuda, sum(t.numel() for t in parts))


def _dispatch(ref: Callable) -> Callable:
    name = ref.__name__.removesuffix("_ref")

    @functools.wraps(ref)
    def op(x, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - the reference's signature
        return (_compiled(ref, COMPILE_BACKEND) if use_compiled(x, name) else ref)(x, *args, **kwargs)

    op.__doc__ = (ref.__doc__ or "").split("\n")[0] + " Compiled on CUDA above a size (m4v.ops.fused)."
    return op


rms_norm = _dispatch(rms_norm_ref)
qkv_heads = _dispatch(qkv_heads_ref)
fold_heads = _dispatch(fold_heads_ref)
ln_modulate = _dispatch(ln_modulate_ref)
gated_residual = _dispatch(gated_residual_ref)

__all__ = [
    "FUSED_MIN_NUMEL",
    "fold_heads",
    "fold_heads_ref",
    "gated_residual",
    "gated_residual_ref",
    "ln_modulate",
    "ln_modulate_ref",
    "qkv_heads",
    "qkv_heads_ref",
    "rms_norm",
    "rms_norm_ref",
    "use_compiled",
]
