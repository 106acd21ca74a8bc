"""Tests for the Moving-Shapes analyser (m4v.eval.shapes) against ground-truth dataset clips."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from m4v.data.moving_shapes import MovingShapes, canonical_caption, render_frames
from m4v.eval import metrics as M
from m4v.eval.sampling import video_filename
from m4v.eval.shapes import (
    ObjectReport,
    ShapesAnalysis,
    analyse,
    analyse_video,
    evaluate_shapes_folder,
    format_flickering,
    mean_flickering,
    score,
    summarise,
)
from m4v.io.video import read_video, write_video


def _accuracy(ds: MovingShapes, transform=lambda v: v) -> dict[str, float]:
    results = []
    for i in range(len(ds)):
        meta = ds.meta(i)
        frames = transform(render_frames(meta, ds.height, ds.width, ds.num_frames))
        results.append(score(analyse(frames), meta))
    return summarise(results)


def test_ground_truth_clips_at_least_99_percent() -> None:
    ds = MovingShapes(200, 64, 64, 17, seed=123, split="all", max_objects=2)
    counts = [len(ds.meta(i)["objects"]) for i in range(len(ds))]
    assert 50 < counts.count(1) < 150  # both one- and two-object clips are tested
    acc = _accuracy(ds)
    for key in ("count", "colour", "shape", "size", "motion", "background", "all"):
        assert acc[key] >= 0.99, (key, acc)


def test_other_sizes_and_lengths() -> None:
    acc = _accuracy(MovingShapes(30, 48, 80, 9, seed=5, split="all"))
    assert acc["all"] >= 0.95, acc


def test_robust_to_h264(tmp_path: Path) -> None:
    ds = MovingShapes(16, 64, 64, 17, seed=9, split="all")

    def roundtrip(frames: np.ndarray) -> np.ndarray:
        write_video(tmp_path / "clip.mp4", frames, fps=8)
        return read_video(tmp_path / "clip.mp4")

    assert _accuracy(ds, roundtrip)["all"] >= 0.9


def test_report_fields_match_the_specification() -> None:
    meta = {"background": "black", "objects": [{"colour": "red", "shape": "square", "size": "big", "motion": "right"}]}
    frames = render_frames(meta, 64, 64, 17)
    result = analyse(frames)
    (obj,) = result.objects
    assert isinstance(result, ShapesAnalysis) and result.background == "black"
    assert (obj.colour, obj.shape, obj.size, obj.motion) == ("red", "square", "big", "right")
    assert obj.fill_ratio == pytest.approx(1.0, abs=0.02) and obj.skewness == pytest.approx(0.0, abs=0.05)
    # canonical placement: 0.03 * 64 = 1.92 px per frame, snapped to whole pixels
    assert obj.velocity[0] == pytest.approx(1.92, abs=0.1) and abs(obj.velocity[1]) < 1e-9
    assert obj.temporal_flickering == result.temporal_flickering == pytest.approx(M.temporal_flickering(frames))
    assert analyse_video(frames.astype(np.float32) / 255)[0].shape == "square"  # float input


@pytest.mark.parametrize(("shape", "fill", "skew"), [("circle", math.pi / 4, 0.0), ("triangle", 0.5, 0.566)])
def test_big_shape_geometry(shape: str, fill: float, skew: float) -> None:
    meta = {"background": "gray", "objects": [{"colour": "blue", "shape": shape, "size": "big", "motion": "up"}]}
    (obj,) = analyse_video(render_frames(meta, 128, 128, 9))
    assert obj.shape == shape and obj.motion == "up"
    assert obj.fill_ratio == pytest.approx(fill, abs=0.06) and obj.skewness == pytest.approx(skew, abs=0.08)


def test_custom_palette() -> None:
    obj = {"colour": "yellow", "shape": "circle", "size": "big", "motion": "still"}
    meta = {"background": "black", "objects": [obj]}
    frames = render_frames(meta, 64, 64, 9)
    (obj,) = analyse_video(frames, colours={"gold": (255, 255, 0)}, backgrounds={"night": (0, 0, 0)})
    assert (obj.colour, obj.shape, obj.motion) == ("gold", "circle", "still")


def _report(colour: str, shape: str, size: str = "big", motion: str = "left") -> ObjectReport:
    return ObjectReport(colour, shape, size, motion, 1.0, 0.0, 0.3, (0.0, 0.0), 17)


def test_score_by_hand() -> None:
    meta = {
        "background": "white",
        "objects": [
            {"colour": "red", "shape": "circle", "size": "big", "motion": "left"},
            {"colour": "blue", "shape": "square", "size": "small", "motion": "up"},
        ],
    }
    perfect = [_report("blue", "square", "small", "up"), _report("red", "circle")]
    assert score(perfect, meta) == {"count": 1.0, "colour": 1.0, "shape": 1.0, "size": 1.0, "motion": 1.0,
                                    "all": 1.0}
    one_wrong = score([_report("red", "triangle"), _report("blue", "square", "small", "down")], meta)
    assert one_wrong["shape"] == 0.5 and one_wrong["motion"] == 0.5 and one_wrong["all"] == 0.0
    missing = score([_report("red", "circle"), _report("green", "square")], meta)
    assert missing["count"] == 1.0 and missing["colour"] == 0.5 and missing["size"] == 0.5
    bg = score(ShapesAnalysis("black", perfect, 1.0), meta)
    assert bg["background"] == 0.0 and bg["all"] == 0.0
    assert summarise([{"a": 1.0}, {"a": 0.0}]) == {"a": 0.5}


def test_evaluate_shapes_folder(tmp_path: Path) -> None:
    ds = MovingShapes(3, 64, 64, 9, seed=4, split="all")
    for i in range(3):
        meta = ds.meta(i)
        write_video(tmp_path / video_filename(canonical_caption(meta), 0), render_frames(meta, 64, 64, 9), fps=8)
    write_video(tmp_path / "not a caption-0.mp4", render_frames(ds.meta(0), 64, 64, 9), fps=8)
    (tmp_path / "junk-0.mp4").write_bytes(b"junk")
    report = evaluate_shapes_folder(tmp_path, progress=False)
    assert report["num_videos"] == 4 and report["num_scored"] == 3
    assert report["accuracy"]["all"] == 1.0 and [s["file"] for s in report["skipped"]] == ["junk-0.mp4"]


def test_one_frame_clips_have_no_flickering_score(tmp_path: Path) -> None:
    """A clip of one frame has no frame pairs: its flickering is unknown (None), not a perfect 100%."""
    meta = {"background": "black", "objects": [{"colour": "red", "shape": "circle", "size": "big", "motion": "right"}]}
    one = render_frames(meta, 64, 64, 9)[:1]
    result = analyse(one)
    assert result.temporal_flickering is None and result.objects[0].temporal_flickering is None
    assert (result.background, result.objects[0].colour) == ("black", "red")  # the frame is still analysed
    assert mean_flickering([None, None]) is None and format_flickering(None).startswith("n/a")
    flicker = M.temporal_flickering(render_frames(meta, 64, 64, 9))
    assert mean_flickering([None, flicker]) == pytest.approx(flicker) and flicker < 1.0
    write_video(tmp_path / video_filename(canonical_caption(meta), 0), one, fps=8)
    report = evaluate_shapes_folder(tmp_path, progress=False)
    assert report["mean_temporal_flickering"] is None and report["per_video"][0]["temporal_flickering"] is None
