"""Video file I/O for generated clips and training data (H.264 .mp4 and .gif through PyAV and Pillow).

``write_video`` writes atomically: it encodes into a hidden temporary file in the destination folder and
moves it into place with ``os.replace`` only after the encoder finished, so a failed or interrupted write
never leaves a partial file (and never damages an existing file at that path).

H.264 in yuv420p needs an even width and height: an odd-sized clip is padded by repeating its last row
and/or column, so reading it back gives the padded (even) size. GIFs keep the exact size; each frame gets
its own 256-colour palette (Pillow, max-coverage quantiser), and the frame duration is rounded to GIF's 10 ms units.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np

SUPPORTED_EXTENSIONS = (".mp4", ".gif")


class VideoInfo(NamedTuple):
    """Basic stream facts of a video file."""

    num_frames: int
    height: int
    width: int
    fps: float


def _to_uint8_frames(frames: Any) -> np.ndarray:
    """[F, H, W, 3] uint8, or float in [0, 1] (clipped, rounded), as ndarray or torch tensor -> uint8 array."""
    if hasattr(frames, "detach") and hasattr(frames, "cpu"):
        frames = frames.detach().cpu()
        if str(frames.dtype) == "torch.bfloat16":
            frames = frames.float()
        frames = frames.numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must have shape [F, H, W, 3] with F >= 1; got {frames.shape}.")
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if np.issubdtype(frames.dtype, np.floating):
        if not np.isfinite(frames).all():
            raise ValueError("frames contain NaN or infinite values.")
        return np.ascontiguousarray(np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8))
    raise ValueError(f"frames must be uint8 or float in [0, 1]; got dtype {frames.dtype}.")


def _pad_even(frames: np.ndarray) -> np.ndarray:
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _write_mp4(tmp: str, frames: np.ndarray, fps: float, crf: int) -> None:
    import av  # imported where used: machines that only generate frames need no FFmpeg
    frames = _pad_even(frames)
    with av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_gif(tmp: str, frames: np.ndarray, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f).quantize(256, method=Image.Quantize.MAXCOVERAGE) for f in frames]
    duration_ms = max(10, int(round(1000.0 / fps / 10.0)) * 10)
    images[0].save(
        tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0, optimize=False
    )


def _file_mode() -> int:
    """Permissions an ordinary new file gets (mkstemp creates 0600 files)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_video(path: str | os.PathLike[str], frames: Any, fps: float = 24, crf: int = 18) -> str:
    """Write [F, H, W, 3] frames (uint8 or float in [0, 1]) to ``.mp4`` (H.264, yuv420p) or ``.gif``.

    The format follows the extension; ``crf`` is the x264 quality (0 lossless .. 51). Returns the path.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(f"video path {path!r} must end in one of {SUPPORTED_EXTENSIONS}; got {ext or 'none'}.")
    if not fps > 0:
        raise ValueError(f"fps must be positive; got {fps}.")
    data = _to_uint8_frames(frames)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    try:
        if ext == ".mp4":
            _write_mp4(tmp, data, float(fps), crf)
        else:
            _write_gif(tmp, data, float(fps))
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _open(path: str | os.PathLike[str]) -> Any:
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"video file {path!r} does not exist.")
    try:
        container = av.open(path, mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read video file {path!r}: {e}") from e
    if not container.streams.video:
        container.close()
        raise ValueError(f"cannot read video file {path!r}: it has no video stream.")
    return container


def read_video(path: str | os.PathLike[str], max_frames: int | None = None) -> np.ndarray:
    """Decode a video file into a [F, H, W, 3] uint8 RGB array (the first ``max_frames`` frames if given)."""
    import av

    frames: list[np.ndarray] = []
    with _open(path) as container:
        try:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except (av.FFmpegError, OSError) as e:
            raise ValueError(f"cannot read video file {os.fspath(path)!r}: {e}") from e
    if not frames:
        raise ValueError(f"cannot read video file {os.fspath(path)!r}: no decodable frames.")
    return np.stack(frames)


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Frame count, size and frame rate of a video file (frames are counted by demuxing, not decoding)."""
    import av

    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or 0
        count = stream.frames
        if not count:
            try:
                count = sum(1 for p in container.demux(stream) if p.size > 0)
            except (av.FFmpegError, OSError) as e:
                raise ValueError(f"cannot read video file {os.fspath(path)!r}: {e}") from e
        return VideoInfo(int(count), int(stream.height), int(stream.width), float(rate))
