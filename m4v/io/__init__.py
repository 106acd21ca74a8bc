"""Video file input/output (.mp4 H.264 and .gif)."""

from m4v.io.video import SUPPORTED_EXTENSIONS, VideoInfo, probe_video, read_video, write_video

__all__ = ["SUPPORTED_EXTENSIONS", "VideoInfo", "probe_video", "read_video", "write_video"]
