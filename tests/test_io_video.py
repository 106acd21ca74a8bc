"""Tests for video file I/O (m4v.io.video): mp4/gif round trips, padding, errors and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import m4v.io.video as video_mod
from m4v.io import probe_video, read_video, write_video


def smooth_clip(f: int, h: int, w: int) -> np.ndarray:
    """Float frames in [0, 1]: slowly moving sinusoids, smooth in space and time."""
    t = np.linspace(0, 1, f)[:, None, None]
    y = np.linspace(0, 1, h)[None, :, None]
    x = np.linspace(0, 1, w)[None, None, :]
    zero = 0 * (t + y + x)
    r = 0.5 + 0.35 * np.sin(2 * np.pi * (x + 0.3 * t)) + zero
    g = 0.5 + 0.35 * np.cos(2 * np.pi * (y - 0.3 * t)) + zero
    b = 0.3 + 0.4 * x * y + zero
    return np.stack([r, g, b], axis=-1)


def _mean_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_mp4_round_trip(tmp_path: Path) -> None:
    clip = smooth_clip(17, 48, 64)
    path = write_video(tmp_path / "a.mp4", clip, fps=24)
    assert path == str(tmp_path / "a.mp4")
    out = read_video(path)
    assert out.shape == (17, 48, 64, 3) and out.dtype == np.uint8
    ref = np.round(clip * 255)
    assert _mean_err(out, ref) < 4.0
    info = probe_video(path)
    assert (info.num_frames, info.height, info.width) == (17, 48, 64)
    assert info.fps == pytest.approx(24.0)
    with av.open(path) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
    assert read_video(path, max_frames=5).shape == (5, 48, 64, 3)


def test_mp4_odd_size_is_padded_by_edge_repeat(tmp_path: Path) -> None:
    clip = smooth_clip(9, 33, 47)
    out = read_video(write_video(tmp_path / "odd.mp4", clip, fps=8))
    assert out.shape == (9, 34, 48, 3)
    ref = np.round(clip * 255)
    assert _mean_err(out[:, :33, :47], ref) < 6.0
    assert _mean_err(out[:, 33, :47], ref[:, 32]) < 6.0  # padded row repeats the last row
    assert _mean_err(out[:, :33, 47], ref[:, :, 46]) < 6.0


def test_gif_round_trip_exact_size(tmp_path: Path) -> None:
    clip = smooth_clip(9, 33, 47)
    path = write_video(tmp_path / "a.gif", clip, fps=10)
    out = read_video(path)
    assert out.shape == (9, 33, 47, 3)
    assert _mean_err(out, np.round(clip * 255)) < 5.0
    info = probe_video(path)
    assert (info.num_frames, info.height, info.width) == (9, 33, 47)
    assert info.fps == pytest.approx(10.0)


def test_inputs_uint8_float_and_tensor_agree(tmp_path: Path) -> None:
    u8 = np.round(smooth_clip(3, 16, 16) * 255).astype(np.uint8)
    a = read_video(write_video(tmp_path / "u8.gif", u8))
    b = read_video(write_video(tmp_path / "f.gif", u8.astype(np.float32) / 255.0))
    c = read_video(write_video(tmp_path / "t.gif", torch.from_numpy(u8)))
    assert np.array_equal(a, b) and np.array_equal(a, c)


@pytest.mark.parametrize(
    ("name", "frames", "kwargs", "pattern"),
    [
        ("a.avi", np.zeros((2, 8, 8, 3), np.uint8), {}, "must end in one of"),
        ("a", np.zeros((2, 8, 8, 3), np.uint8), {}, "must end in one of"),
        ("a.mp4", np.zeros((2, 8, 8), np.uint8), {}, r"\[F, H, W, 3\]"),
        ("a.mp4", np.zeros((0, 8, 8, 3), np.uint8), {}, r"F >= 1"),
        ("a.mp4", np.zeros((2, 8, 8, 3), np.int64), {}, "uint8 or float"),
        ("a.mp4", np.full((2, 8, 8, 3), np.nan), {}, "NaN"),
        ("a.mp4", np.zeros((2, 8, 8, 3), np.uint8), {"fps": 0}, "fps"),
    ],
)
def test_write_errors(tmp_path: Path, name: str, frames: np.ndarray, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        write_video(tmp_path / name, frames, **kwargs)
    assert os.listdir(tmp_path) == []


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="cannot read video file"):
        read_video(bad)
    good = write_video(tmp_path / "good.mp4", smooth_clip(9, 32, 32))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(Path(good).read_bytes()[:500])
    with pytest.raises(ValueError, match="cannot read video file"):
        read_video(cut)
    text = tmp_path / "text.gif"
    text.write_text("not a gif")
    with pytest.raises(ValueError, match="cannot read video file"):
        probe_video(text)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_mp4_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: type) -> None:
    old = write_video(tmp_path / "out.mp4", smooth_clip(9, 16, 16))
    old_bytes = Path(old).read_bytes()
    real = av.VideoFrame.from_ndarray
    calls = {"n": 0}

    def failing(*args: object, **kwargs: object) -> av.VideoFrame:
        calls["n"] += 1
        if calls["n"] == 4:
            raise exc("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    for name in ("out.mp4", "new.mp4"):  # fails on the 4th frame, after 3 frames went to the encoder
        calls["n"] = 0
        with pytest.raises(exc, match="injected"):
            write_video(tmp_path / name, smooth_clip(17, 16, 16))
        assert calls["n"] == 4
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"]  # no temp file, no partial new.mp4
    assert Path(old).read_bytes() == old_bytes  # the existing file is untouched


def test_failed_gif_write_after_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def partial(tmp: str, frames: np.ndarray, fps: float) -> None:
        with open(tmp, "wb") as f:
            f.write(b"GIF89a partial")
        raise OSError("disk full")

    monkeypatch.setattr(video_mod, "_write_gif", partial)
    with pytest.raises(OSError, match="disk full"):
        write_video(tmp_path / "sub" / "x.gif", smooth_clip(3, 8, 8))
    assert os.listdir(tmp_path / "sub") == []


def test_written_file_has_ordinary_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    path = write_video(tmp_path / "p.gif", smooth_clip(2, 8, 8))
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
