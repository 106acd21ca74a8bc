"""Tests for the generation mode of the Moving-Shapes evaluation (m4v.eval.shapes_generate, `m4v eval shapes
--model`): an oracle that renders the ground truth, a wrong oracle, resuming, the shipped model, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from m4v.cli import main
from m4v.data.moving_shapes import BACKGROUNDS, HELDOUT_PAIRS, MOTIONS, complete_meta, heldout_prompts, render_frames
from m4v.eval.sampling import video_filename
from m4v.eval.shapes_generate import evaluate_generated, format_report, select_prompts
from m4v.generate_cli import default_model_dir
from m4v.io.video import read_video, write_video

H, W, F = 64, 64, 17


def _oracle(items: list[dict[str, Any]], swap: dict[str, str] | None = None):  # noqa: ANN202 - GenerateFn
    """Renders each prompt's ground-truth clip, placed at random per (prompt, seed); ``swap`` renders some
    motions as others (a model that gets the direction wrong)."""
    metas = {it["prompt"]: it["meta"] for it in items}
    index = {p: k for k, p in enumerate(metas)}
    calls: list[tuple[str, int]] = []

    def generate(prompt: str, seed: int) -> np.ndarray:
        calls.append((prompt, seed))
        meta = json.loads(json.dumps(metas[prompt]))
        for obj in meta["objects"]:
            obj["motion"] = (swap or {}).get(obj["motion"], obj["motion"])
        placed = complete_meta(meta, H, W, F, rng=np.random.default_rng([index[prompt], seed]))
        return render_frames(placed, H, W, F)

    generate.calls = calls  # type: ignore[attr-defined]
    return generate


def test_heldout_prompts_cover_every_pair_motion_background() -> None:
    items = heldout_prompts(seeds_per_prompt=2)
    combos = {(o["colour"], o["shape"], o["motion"], it["meta"]["background"])
              for it in items for o in it["meta"]["objects"]}
    assert combos == {(c, s, m, b) for c, s in HELDOUT_PAIRS for m in MOTIONS for b in BACKGROUNDS}
    assert len(items) == 2 * len(combos) == 90


def test_oracle_reaches_99_percent(tmp_path: Path) -> None:
    items = heldout_prompts(seeds_per_prompt=2)
    generate = _oracle(items)
    report = evaluate_generated(generate, items, tmp_path, progress=False)
    assert report["num_videos"] == 90 and report["num_prompts"] == 45 and report["generated"] == 90
    assert sorted(generate.calls) == sorted((it["prompt"], it["seed"]) for it in items)
    for key in ("colour", "shape", "motion", "size", "background"):
        assert report["accuracy"][key] >= 0.99, (key, report["accuracy"])
    # the flickering of each video equals the VBench formula on the decoded file
    from m4v.eval.metrics import temporal_flickering

    video = report["per_prompt"][0]["videos"][0]
    assert video["temporal_flickering"] == pytest.approx(temporal_flickering(read_video(tmp_path / video["file"])))
    assert 0.9 < report["mean_temporal_flickering"] <= 1.0
    assert {p["prompt"] for p in report["per_prompt"]} == {it["prompt"] for it in items}
    assert all(len(p["videos"]) == 2 for p in report["per_prompt"])
    assert "colour 100.0%" in format_report(report)
    # in memory (no H.264 file): the same accuracy on the exact frames
    memory = evaluate_generated(_oracle(items), items, None, progress=False)
    assert memory["accuracy"] == report["accuracy"] and memory["generated"] == 90


def test_wrong_directions_are_counted_wrong(tmp_path: Path) -> None:
    """Left and right swapped: 2 of the 5 motions wrong -> motion accuracy 3/5; colour and shape unaffected."""
    items = heldout_prompts(seeds_per_prompt=1)
    report = evaluate_generated(_oracle(items, swap={"left": "right", "right": "left"}), items, tmp_path,
                                progress=False)
    assert report["accuracy"]["motion"] == pytest.approx(3 / 5)
    assert report["accuracy"]["colour"] == report["accuracy"]["shape"] == 1.0
    motion = report["breakdown"]["motion"]
    assert motion["left"]["accuracy"]["motion"] == motion["right"]["accuracy"]["motion"] == 0.0
    assert motion["up"]["accuracy"]["motion"] == 1.0


def test_resume_reuses_and_repairs(tmp_path: Path) -> None:
    items = select_prompts(heldout_prompts(seeds_per_prompt=2), limit=3)
    assert len(items) == 6 and len({it["prompt"] for it in items}) == 3
    first = evaluate_generated(_oracle(items), items, tmp_path, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(video_filename(it["prompt"], it["seed"]) for it in items)
    broken = tmp_path / names[0]
    broken.write_bytes(b"not a video")
    generate = _oracle(items)
    second = evaluate_generated(generate, items, tmp_path, progress=False)
    assert (second["generated"], second["reused"]) == (1, 5) and len(generate.calls) == 1
    assert second["accuracy"] == first["accuracy"] and second["warnings"]


def test_select_prompts_limit() -> None:
    items = heldout_prompts(seeds_per_prompt=2)
    sub = select_prompts(items, 5)
    assert len({it["prompt"] for it in sub}) == 5 and len(sub) == 10
    assert select_prompts(items, 5) == sub and select_prompts(items, 100) == items
    order = [it["prompt"] for it in items]
    assert [order.index(it["prompt"]) for it in sub] == sorted(order.index(it["prompt"]) for it in sub)
    with pytest.raises(ValueError, match="--limit"):
        select_prompts(items, 0)


def test_videos_mode_still_works_on_generated_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    items = select_prompts(heldout_prompts(seeds_per_prompt=1), limit=4)
    generated = evaluate_generated(_oracle(items), items, tmp_path, progress=False)
    assert main(["eval", "shapes", "--videos", str(tmp_path), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_scored"] == 4 and report["accuracy"] == generated["accuracy"]


def test_shipped_model_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Random tiny weights: the accuracy means nothing, but every number is a fraction and the videos exist."""
    out, videos = tmp_path / "report.json", tmp_path / "videos"
    args = ["eval", "shapes", "--model", default_model_dir(), "--seeds", "1", "--steps", "1", "--limit", "2",
            "--videos-out", str(videos), "--out", str(out), "--no-progress"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    assert (report["num_videos"], report["num_prompts"], report["generated"]) == (2, 2, 2)
    settings = report["settings"]  # the model's defaults (the shipped model may change size)
    assert set(settings["steps"]) == {1} and settings["seeds"] == 1 and settings["limit"] == 2
    values = [*report["accuracy"].values(), report["mean_temporal_flickering"]]
    assert all(0.0 <= v <= 1.0 for v in values), values
    for p in report["per_prompt"]:
        (v,) = p["videos"]
        shape = (settings["num_frames"], settings["height"], settings["width"], 3)
        assert read_video(videos / v["file"]).shape == shape and v["file"] == video_filename(p["prompt"], 0)
    assert main(args) == 0  # resumed: nothing generated again, text report
    text = capsys.readouterr().out
    assert "2 video(s) of 2 held-out prompts" in text and "(0 generated, 2 reused)" in text


def test_frames_out_then_frames_scores_like_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Generate-only (--frames-out) on one machine, score (--frames) on another: the same report as --model."""
    common = ["--seeds", "1", "--steps", "1", "--limit", "2", "--no-progress"]
    model = default_model_dir()
    assert main(["eval", "shapes", "--model", model, *common, "--out", str(tmp_path / "direct.json")]) == 0
    frames = tmp_path / "frames.npz"
    assert main(["eval", "shapes", "--model", model, *common, "--frames-out", str(frames)]) == 0
    assert "2 held-out video(s)" in capsys.readouterr().out
    later_args = ["--frames", str(frames), "--out", str(tmp_path / "later.json"), "--no-progress"]
    assert main(["eval", "shapes", *later_args]) == 0
    direct, later = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("direct", "later"))
    assert later["frames"] == str(frames)
    for key in ("accuracy", "mean_temporal_flickering", "settings", "per_prompt", "breakdown", "model"):
        assert later[key] == direct[key], key
    _one_line_error(capsys, ["eval", "shapes", "--frames", str(frames), "--seeds", "1"], "--seeds: only used")
    _one_line_error(capsys, ["eval", "shapes", "--frames", str(tmp_path / "direct.json")], "not a frames file")
    _one_line_error(capsys, ["eval", "shapes", "--videos", str(tmp_path), "--frames-out", str(frames)], "--frames-out")
    # --in-memory: the same frames scored without the file round trip
    assert main(["eval", "shapes", "--model", model, *common, "--in-memory", "--out", str(tmp_path / "mem.json")]) == 0
    mem = json.loads((tmp_path / "mem.json").read_text())
    assert mem["in_memory"] and mem["num_videos"] == 2 and mem["settings"] == direct["settings"]
    assert 0.0 <= mem["accuracy"]["colour"] <= 1.0
    _one_line_error(capsys, ["eval", "shapes", "--frames", str(frames), "--in-memory"], "--in-memory")


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_errors_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_video(tmp_path / "a big red circle staying still on a black background-0.mp4",
                render_frames({"background": "black", "objects": [
                    {"colour": "red", "shape": "circle", "size": "big", "motion": "still"}]}, H, W, 5))
    model = default_model_dir()
    _one_line_error(capsys, ["eval", "shapes"], "exactly one of --videos")
    _one_line_error(capsys, ["eval", "shapes", "--videos", str(tmp_path), "--model", model], "exactly one of --videos")
    _one_line_error(capsys, ["eval", "shapes", "--model", str(tmp_path / "missing")], "does not exist")
    _one_line_error(capsys, ["eval", "shapes", "--videos", str(tmp_path), "--seeds", "1"], "--seeds: only used")
    _one_line_error(capsys, ["eval", "shapes", "--model", model, "--seeds", "0"], "--seeds")
    _one_line_error(capsys, ["eval", "shapes", "--model", model, "--steps", "0"], "--steps")
    _one_line_error(capsys, ["eval", "shapes", "--model", model, "--limit", "0"], "--limit")
    _one_line_error(capsys, ["eval", "shapes", "--model", model, "--self-quality-guidance", "0.3"], "would never apply")
    _one_line_error(capsys, ["eval", "shapes", "--videos", str(tmp_path), "--sqg-start-frame", "1"], "only used")
    # output paths are checked before the work, not after it
    _one_line_error(capsys, ["eval", "shapes", "--videos", str(tmp_path), "--out", str(tmp_path)], "--out:")
    blocker = tmp_path / "afile"
    blocker.write_text("")
    _one_line_error(capsys, ["eval", "shapes", "--model", model, "--videos-out", str(blocker)], "--videos-out:")
    _one_line_error(capsys, ["eval", "vbench", "--videos", str(tmp_path), "--out", str(tmp_path)], "is a folder")
    assert main(["eval", "shapes", "--videos", str(tmp_path), "--no-progress"]) == 0
    assert "accuracy over 1 captioned video(s)" in capsys.readouterr().out


def test_batched_generation_gives_the_videos_of_single_runs(tmp_path: Path) -> None:
    """--batch-size N: each video keeps its own seed's noise, so the frames match one-at-a-time generation."""
    common = ["eval", "shapes", "--model", default_model_dir(), "--seeds", "2", "--steps", "1", "--limit", "2",
              "--no-progress"]
    for n in (1, 3):
        assert main([*common, "--batch-size", str(n), "--frames-out", str(tmp_path / f"b{n}.npz")]) == 0
    one, three = np.load(tmp_path / "b1.npz"), np.load(tmp_path / "b3.npz")
    keys = sorted(k for k in one.files if k.startswith("video_"))
    assert len(keys) == 4 and keys == sorted(k for k in three.files if k.startswith("video_"))
    for k in keys:  # batched matmuls may round differently: at most one grey level apart
        assert np.abs(one[k].astype(int) - three[k].astype(int)).max() <= 1, k
    assert not np.array_equal(one[keys[0]], one[keys[1]])  # seeds 0 and 1 of a prompt differ
    assert main([*common, "--batch-size", "0"]) == 2
