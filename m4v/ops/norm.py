"""Gated RMSNorm of the Mamba2 mixer output (M4V Sec. 3.1): ``rmsnorm(y * silu(z))`` per channel group, times a weight.

``gated_rms_norm_torch`` is the reference (and CPU) path, the same computation as
``m4v.layers.norms.GatedRMSNorm.forward``; ``gated_rms_norm`` dispatches to the fused Triton kernel
(``m4v.ops.norm_triton``) for CUDA tensors when triton is importable, unless M4V_DISABLE_TRITON=1.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors, unchanged otherwise (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int) -> None:
    if y.dim() < 1 or z.shape != y.shape:
        raise ValueError(f"z must have the shape of y {tuple(y.shape)}, got {tuple(z.shape)}.")
    d = y.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight must have shape [{d}], got {tuple(weight.shape)}.")
    if not isinstance(group_size, int) or group_size < 1 or d % group_size:
        raise ValueError(f"group_size must be a positive divisor of the channel count {d}, got {group_size!r}.")


def gated_rms_norm_torch(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float = 1e-5
) -> torch.Tensor:
    """``rmsnorm(y * silu(z))`` over groups of ``group_size`` channels, times ``weight``; output in y's dtype.

    Math in float32 for half-precision inputs (float64 stays float64), exactly as GatedRMSNorm.forward.
    """
    _check(y, z, weight, group_size)
    g = (upcast(y) * F.silu(upcast(z))).unflatten(-1, (-1, group_size))
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.flatten(-2) * weight.to(g.dtype)).to(y.dtype)


@functools.cache
def _triton_importable() -> bool:
    try:
        import m4v.ops.norm_triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(y: torch.Tensor, z: torch.Tensor) -> bool:
    if not y.is_cuda or os.environ.get("M4V_DISABLE_TRITON", "0") == "1":
        return False
    return y.dtype in TRITON_DTYPES and z.dtype in TRITON_DTYPES and _triton_importable()


def gated_rms_norm(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float = 1e-5
) -> torch.Tensor:
    """Gated RMSNorm ``rmsnorm(y * silu(z)) * weight`` per group; fused Triton kernel on CUDA, torch otherwise.

    Args:
        y: [..., d] SSM output. z: [..., d] gate (same shape; may be a strided slice). weight: [d].
        group_size: channels per normalisation group (divides d). eps: added to the mean square.

    Returns:
        [..., d] tensor in y's dtype; differentiable in y, z and weight on both paths.
    """
    _check(y, z, weight, group_size)
    if _use_triton(y, z):
        from m4v.ops.norm_triton import gated_rms_norm as gated_rms_norm_triton

        return gated_rms_norm_triton(y, z, weight, group_size, eps)
    return gated_rms_norm_torch(y, z, weight, group_size, eps)


__all__ = ["gated_rms_norm", "gated_rms_norm_torch", "upcast"]
