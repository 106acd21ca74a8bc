"""Depthwise causal conv1d of the Mamba2 block (short conv before the SSM, arXiv:2405.21060; M4V Sec. 3)."""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

_ACTIVATIONS = (None, "silu", "swish")
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TRITON_MAX_TAPS = 4


@functools.cache
def _triton_importable() -> bool:
    try:
        import m4v.ops.conv_triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(x: torch.Tensor, weight: torch.Tensor, seq_mask: torch.Tensor | None) -> bool:
    """Fused Triton kernel for CUDA inputs it supports, unless M4V_DISABLE_TRITON=1 or triton is missing."""
    if not x.is_cuda or os.environ.get("M4V_DISABLE_TRITON", "0") == "1":
        return False
    if x.dtype not in _TRITON_DTYPES or weight.shape[1] > _TRITON_MAX_TAPS:
        return False
    if seq_mask is not None and seq_mask.requires_grad:
        return False  # the kernel treats the mask as a constant
    return _triton_importable()


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    seq_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution over the sequence: out[:, t, c] = sum_j weight[c, j] * x[:, t-k+1+j, c].

    Args:
        x: [b, l, d] inputs; positions before the start count as zeros.
        weight: [d, k] per-channel taps; the last tap multiplies the current step.
        bias: optional [d], added before the activation.
        activation: None, or "silu" ("swish" is an alias).
        seq_mask: optional [b, l] (bool or 0/1) marking valid tokens. Invalid inputs are zeroed before the
            convolution (so they contribute nothing) and invalid outputs are zeroed after it.

    Returns:
        [b, l, d] tensor in x's dtype.

    CUDA inputs run the fused Triton kernel (m4v.ops.conv_triton; float32 accumulation) when triton is
    importable, unless the environment sets M4V_DISABLE_TRITON=1; everything else runs the torch path below.
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape [batch, length, channels], got {tuple(x.shape)}.")
    b, l, d = x.shape
    if weight.dim() != 2 or weight.shape[0] != d:
        raise ValueError(f"weight must have shape [{d}, kernel_size], got {tuple(weight.shape)}.")
    if bias is not None and bias.shape != (d,):
        raise ValueError(f"bias must have shape [{d}], got {tuple(bias.shape)}.")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None or 'silu', got {activation!r}.")
    if seq_mask is not None and seq_mask.shape != (b, l):
        raise ValueError(f"seq_mask must have shape [{b}, {l}], got {tuple(seq_mask.shape)}.")
    if _use_triton(x, weight, seq_mask):
        from m4v.ops.conv_triton import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, activation, seq_mask)
    return _causal_conv1d_torch(x, weight, bias, activation, seq_mask)


def _causal_conv1d_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    seq_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The torch path of causal_conv1d (arguments already checked): reference, CPU and fallback implementation."""
    d, k = weight.shape
    mask = None if seq_mask is None else seq_mask.to(x.dtype).unsqueeze(-1)
    if mask is not None:
        x = x * mask
    w = weight.to(x.dtype).unsqueeze(1)  # [d, 1, k]
    bb = None if bias is None else bias.to(x.dtype)
    out = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), w, bb, groups=d).transpose(1, 2)
    if activation is not None:
        out = F.silu(out)
    if mask is not None:
        out = out * mask
    return out
