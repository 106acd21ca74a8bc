"""Text/image-to-video pipeline (paper Sec. 3.1, E.2, E.3)."""

from m4v.pipelines.pipeline_m4v import M4VPipeline, M4VPipelineOutput
from m4v.pipelines.pipeline_wan import M4VWanPipeline

__all__ = ["M4VPipeline", "M4VPipelineOutput", "M4VWanPipeline"]
