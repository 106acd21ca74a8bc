"""Pyramidal flow-matching scheduler and pyramid/noise utilities (paper Sec. 3.1, A.3)."""

from .pyramid import (
    block_noise,
    constant_corruption_sigmas,
    corrupt,
    downsample,
    linear_corruption_sigmas,
    pyramid_noise,
    temporal_pyramid_history,
    upsample_nearest,
)
from .pyramid_flow import PyramidFlowMatchScheduler, PyramidFlowSchedulerOutput

__all__ = [
    "PyramidFlowMatchScheduler",
    "PyramidFlowSchedulerOutput",
    "block_noise",
    "constant_corruption_sigmas",
    "corrupt",
    "downsample",
    "linear_corruption_sigmas",
    "pyramid_noise",
    "temporal_pyramid_history",
    "upsample_nearest",
]
