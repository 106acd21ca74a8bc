"""Tests for VBench headline scores, folder evaluation, reports and the ``m4v eval`` CLI (m4v.eval.vbench,
m4v.eval.report, m4v.eval.cli)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import m4v.cli as m4v_cli
from m4v.eval import metrics as M
from m4v.eval.cli import register
from m4v.eval.report import bar_chart_png, format_report
from m4v.eval.sampling import video_filename
from m4v.eval.vbench import c1_average, discover_videos, evaluate_folder, vbench_scores
from m4v.io.video import read_video, write_video

# independent copy of VBench's constants (scripts/constant.py): dimension -> (min, max, weight)
CONST = {
    "subject_consistency": (0.1462, 1.0, 1.0),
    "background_consistency": (0.2615, 1.0, 1.0),
    "temporal_flickering": (0.6293, 1.0, 1.0),
    "motion_smoothness": (0.706, 0.9975, 1.0),
    "dynamic_degree": (0.0, 1.0, 0.5),
    "aesthetic_quality": (0.0, 1.0, 1.0),
    "imaging_quality": (0.0, 1.0, 1.0),
    "object_class": (0.0, 1.0, 1.0),
    "multiple_objects": (0.0, 1.0, 1.0),
    "human_action": (0.0, 1.0, 1.0),
    "color": (0.0, 1.0, 1.0),
    "spatial_relationship": (0.0, 1.0, 1.0),
    "scene": (0.0, 0.8222, 1.0),
    "appearance_style": (0.0009, 0.2855, 1.0),
    "temporal_style": (0.0, 0.364, 1.0),
    "overall_consistency": (0.0, 0.364, 1.0),
}
QUALITY = list(CONST)[:7]
SEMANTIC = list(CONST)[7:]


def test_vbench_formula_by_hand() -> None:
    rng = np.random.default_rng(0)
    raw = {d: float(lo + (hi - lo) * rng.uniform(0.3, 1.0)) for d, (lo, hi, _) in CONST.items()}
    norm = {d: (raw[d] - lo) / (hi - lo) * w for d, (lo, hi, w) in CONST.items()}
    quality = sum(norm[d] for d in QUALITY) / 6.5  # six weights of 1 and dynamic degree 0.5
    semantic = sum(norm[d] for d in SEMANTIC) / 9.0
    out = vbench_scores(raw)
    assert out["quality_score"] == pytest.approx(quality, abs=1e-12)
    assert out["semantic_score"] == pytest.approx(semantic, abs=1e-12)
    assert out["total_score"] == pytest.approx((4 * quality + semantic) / 5, abs=1e-12)
    assert out["missing_quality"] == [] and out["missing_semantic"] == []


def test_vbench_partial_scores() -> None:
    raw = {"temporal_flickering": 0.98, "dynamic_degree": 0.6}
    out = vbench_scores(raw)
    assert out["quality_score"] is None and out["total_score"] is None
    expected = ((0.98 - 0.6293) / (1 - 0.6293) + 0.5 * 0.6) / 1.5
    assert out["partial_quality_score"] == pytest.approx(expected, abs=1e-12)
    assert "imaging_quality" in out["missing_quality"]
    with pytest.raises(ValueError, match="unknown VBench dimension"):
        vbench_scores({"sharpness": 0.5})


def test_c1_average() -> None:
    seven = {d: 0.1 * (i + 1) for i, d in enumerate(
        ["subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
         "aesthetic_quality", "imaging_quality", "overall_consistency"])}
    assert c1_average(seven)["average"] == pytest.approx(0.4)
    part = c1_average({"temporal_flickering": 0.9, "dynamic_degree": 0.1, "motion_smoothness": 0.7})
    assert part["average"] is None and part["partial_average"] == pytest.approx(0.8)


# ----------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------


def _clip(seed: int, frames: int = 9, size: int = 32) -> np.ndarray:
    """A textured square moving right by 2 px per frame over a flat background."""
    rng = np.random.default_rng(seed)
    v = np.full((frames, size, size, 3), 40 + 10 * seed, np.uint8)
    tex = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for t in range(frames):
        v[t, 12:20, 2 + 2 * t : 10 + 2 * t] = tex
    return v


@pytest.fixture()
def video_dir(tmp_path: Path) -> Path:
    d = tmp_path / "videos"
    prompts = ["a cat playing in park", "a red car/bus turning a corner"]
    for p in prompts:
        for i in range(2):
            write_video(d / video_filename(p, i), _clip(len(p) % 5 + i), fps=8)
    (d / "broken-0.mp4").write_bytes(b"this is not a video")
    (d / "notes.txt").write_text("ignored")
    (tmp_path / "prompts.txt").write_text("# test prompts\n" + "\n".join(prompts) + "\n", encoding="utf-8")
    return d


def test_discover_videos_maps_names_to_prompts(video_dir: Path) -> None:
    entries, warnings = discover_videos(video_dir, video_dir.parent / "prompts.txt")
    by_name = {e.path.name: e for e in entries}
    assert len(entries) == 5 and "notes.txt" not in by_name
    car = by_name["a red car_bus turning a corner-1.mp4"]
    assert car.prompt == "a red car/bus turning a corner" and car.index == 1 and car.matched
    assert not by_name["broken-0.mp4"].matched and "broken-0.mp4" in warnings[0]


def test_evaluate_folder_skips_corrupt_and_matches_metrics(video_dir: Path) -> None:
    report = evaluate_folder(video_dir, prompts=video_dir.parent / "prompts.txt", progress=False)
    assert report["num_videos"] == 4
    assert [s["file"] for s in report["skipped"]] == ["broken-0.mp4"]
    rows = {r["file"]: r for r in report["per_video"]}
    name = video_filename("a cat playing in park", 1)
    decoded = read_video(video_dir / name)
    assert rows[name]["scores"]["temporal_flickering"] == pytest.approx(M.temporal_flickering(decoded), abs=1e-12)
    assert rows[name]["scores"]["motion_smoothness_proxy"] == pytest.approx(M.motion_smoothness_proxy(decoded))
    # the dimension value is the mean over videos (flickering) / over all frames (consistency)
    flick = [r["scores"]["temporal_flickering"] for r in report["per_video"]]
    assert report["dimensions"]["temporal_flickering"]["value"] == pytest.approx(np.mean(flick))
    frames = [M.background_consistency_proxy_scores(read_video(video_dir / f)) for f in rows]
    assert report["dimensions"]["background_consistency"]["value"] == pytest.approx(np.concatenate(frames).mean())
    assert report["dimensions"]["subject_consistency"]["source"].startswith("proxy")
    assert "overall_consistency" not in report["dimensions"]  # needs --clip
    assert report["vbench"]["total_score"] is None
    text = format_report(report)
    assert "temporal_flickering" in text and "skipped broken-0.mp4" in text


def test_subsets_follow_prompt_sections(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("# [temporal_flickering]\na still lake\n# [subject_consistency]\na dog running\n")
    write_video(tmp_path / "v" / "a still lake-0.mp4", _clip(0), fps=8)
    write_video(tmp_path / "v" / "a dog running-0.mp4", _clip(1), fps=8)
    report = evaluate_folder(tmp_path / "v", prompts=prompts, subsets=True, progress=False)
    rows = {r["prompt"]: r["scores"] for r in report["per_video"]}
    assert set(rows["a still lake"]) == {"temporal_flickering"}
    dog = {"subject_consistency_proxy", "motion_smoothness_proxy", "dynamic_degree_proxy"}
    assert set(rows["a dog running"]) == dog


def test_empty_and_unreadable_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no video files"):
        evaluate_folder(tmp_path / "empty", progress=False)
    with pytest.raises(ValueError, match="is not a directory"):
        evaluate_folder(tmp_path / "missing", progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x-0.mp4").write_bytes(b"junk")
    with pytest.raises(ValueError, match="could be read"):
        evaluate_folder(tmp_path / "bad", progress=False)


# ----------------------------------------------------------------------------------------------
# report and CLI
# ----------------------------------------------------------------------------------------------


def test_bar_chart_bar_lengths(tmp_path: Path) -> None:
    path = bar_chart_png(["a", "b"], [25.0, 100.0], tmp_path / "c.png", colours=[(255, 0, 0), (0, 0, 255)])
    img = np.asarray(Image.open(path).convert("RGB"))
    red = np.all(img == (255, 0, 0), axis=-1).sum(axis=1).max()
    blue = np.all(img == (0, 0, 255), axis=-1).sum(axis=1).max()
    assert blue > 100 and red == pytest.approx(blue / 4, abs=2)
    with pytest.raises(ValueError, match=r"\.png"):
        bar_chart_png(["a"], [1.0], tmp_path / "c.jpg")


def _main(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(m4v_cli, "_extra_commands", lambda: [register])
    return m4v_cli.main(argv)


def test_cli_vbench_json_and_plot(video_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    plot, out = tmp_path / "chart.png", tmp_path / "r.json"
    argv = ["eval", "vbench", "--videos", str(video_dir), "--json", "--plot", str(plot), "--out", str(out),
            "--no-progress"]
    assert _main(argv, monkeypatch) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_videos"] == 4 and json.loads(out.read_text())["num_videos"] == 4
    assert Image.open(plot).format == "PNG"


def test_cli_user_errors_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert _main(["eval", "vbench", "--videos", str(tmp_path / "empty")], monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no video files" in err
    assert _main(["eval", "vbench", "--videos", str(tmp_path), "--plot", "x.jpg"], monkeypatch) == 2
    assert "--plot" in capsys.readouterr().err
    assert _main(["eval", "vbench", "--videos", str(tmp_path), "--prompts", "nope"], monkeypatch) == 2
    assert "--prompts" in capsys.readouterr().err


def test_cli_prompts(monkeypatch, capsys) -> None:
    assert _main(["eval", "prompts", "vbench_custom50"], monkeypatch) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 50


def test_single_frame_videos_give_a_clear_error(tmp_path, capsys):
    """One-frame videos leave every dimension empty: one line, exit 2, no empty report or chart."""
    import numpy as np

    from m4v.cli import main
    from m4v.io.video import write_video

    for i in range(2):
        write_video(tmp_path / f"a cat-{i}.mp4", np.full((1, 16, 16, 3), 100, np.uint8))
    plot = tmp_path / "chart.png"
    assert main(["eval", "vbench", "--videos", str(tmp_path), "--plot", str(plot), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "at least 2 frames" in err and len(err.strip().splitlines()) == 1
    assert not plot.exists()


def test_subsets_without_a_vbench_prompt_say_so(tmp_path, capsys):
    """--subsets on videos whose prompts are in no VBench list: the error names that, not the frame count."""
    import numpy as np

    from m4v.cli import main
    from m4v.io.video import write_video

    rng = np.random.default_rng(0)
    write_video(tmp_path / "my own prompt-0.mp4", rng.integers(0, 255, (9, 16, 16, 3), dtype=np.uint8))
    assert main(["eval", "vbench", "--videos", str(tmp_path), "--subsets", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--subsets" in err and "VBench prompt list" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "vbench", "--videos", str(tmp_path), "--no-progress", "--json"]) == 0  # scored without it
