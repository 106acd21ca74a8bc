"""Low-level ops of the Mamba2 block used by M4V (Sec. 3): the SSD scan, its backends, the causal conv."""

from m4v.ops.conv import causal_conv1d
from m4v.ops.norm import gated_rms_norm, gated_rms_norm_torch
from m4v.ops.registry import (
    get_ssd_backend,
    list_ssd_backends,
    register_ssd_backend,
    select_ssd_backend,
    unregister_ssd_backend,
)
from m4v.ops.ssd import ssd, ssd_torch

try:  # optional fused GPU backend; registers itself as "triton" when triton is importable
    import m4v.ops.ssd_triton  # noqa: F401
except ImportError:
    pass

__all__ = [
    "causal_conv1d",
    "gated_rms_norm",
    "gated_rms_norm_torch",
    "get_ssd_backend",
    "list_ssd_backends",
    "register_ssd_backend",
    "select_ssd_backend",
    "ssd",
    "ssd_torch",
    "unregister_ssd_backend",
]
