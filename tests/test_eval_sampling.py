"""Tests for prompt suites, VBench naming and the resumable sampling loop (m4v.eval.sampling)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from m4v.eval.sampling import (
    load_prompts,
    match_prompt,
    parse_prompt_text,
    parse_video_filename,
    prompt_sections,
    sample_prompts,
    video_filename,
)
from m4v.io.video import read_video


def test_naming_round_trip() -> None:
    assert video_filename("a cat playing in park", 3) == "a cat playing in park-3.mp4"
    assert parse_video_filename("a cat playing in park-3.mp4") == ("a cat playing in park", 3)
    assert parse_video_filename("dir/x-y-12.mp4") == ("x-y", 12)
    assert parse_video_filename("no index.mp4") == ("no index", None)
    slash = "a red car/bus"
    name = video_filename(slash, 0)
    assert "/" not in name and match_prompt(parse_video_filename(name)[0], ["x", slash]) == slash


def test_long_prompt_is_cut_and_still_matched() -> None:
    long = "A majestic steam train café " * 20  # ~560 characters, non-ASCII included
    name = video_filename(long, 4)
    assert len(name.encode("utf-8")) <= 255
    stem, index = parse_video_filename(name)
    assert index == 4 and match_prompt(stem, ["short", long.strip()]) == long.strip()


def test_parse_prompt_text_sections_and_duplicates() -> None:
    prompts, sections = parse_prompt_text("# header\n\n# [scene]\nalley\nbar\n# [other]\nalley\ncat\n")
    assert prompts == ["alley", "bar", "cat"]
    assert sections == {"alley": "scene", "bar": "scene", "cat": "other"}


def test_builtin_vbench_custom50() -> None:
    prompts = load_prompts("vbench_custom50")
    assert len(prompts) == 50 == len(set(prompts))
    sections = prompt_sections("vbench_custom50")
    counts = {s: list(sections.values()).count(s) for s in set(sections.values())}
    assert counts == {"subject_consistency": 15, "scene": 10, "temporal_flickering": 10, "overall_consistency": 15}
    # systematic sampling starts at the first line of each VBench list
    for first in ("a person swimming in ocean", "alley", "In a still frame, a stop sign",
                  "Close up of grapes on a rotating table."):
        assert first in prompts


def test_builtin_user_study50() -> None:
    prompts = load_prompts("user_study50")
    assert len(prompts) == 49  # paper prompt 47 is missing from the paper text
    assert prompts[0].startswith("A breathtaking coastal beach in spring, where gentle waves caress")
    assert prompts[44] == "A young woman with glasses is jogging in the park wearing a pink headband."
    assert prompts[46] == "a child is playing the guitar in a flower garden."  # paper prompt 48
    assert prompts[-1] == "a group of school children is seen walking together, with smartphones."
    assert not any(re.search(r"\d", p) for p in prompts)  # no PDF line numbers left in the text


def test_load_prompts_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--prompts"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")


def _fake_generate(calls: list[tuple[str, int]]):
    def generate(prompt: str, seed: int) -> np.ndarray:
        calls.append((prompt, seed))
        colour = np.random.default_rng(seed).integers(30, 180, 3)  # smooth content: H.264 keeps it closely
        frames = np.zeros((5, 16, 16, 3), np.int64) + colour + 2 * np.arange(16)[None, None, :, None]
        return (frames + 10 * np.arange(5)[:, None, None, None]).astype(np.uint8)

    return generate


def test_sample_prompts_names_seeds_and_resume(tmp_path: Path) -> None:
    calls: list[tuple[str, int]] = []
    prompts = ["a cat", "a dog", "a cat"]  # duplicates are sampled once
    paths = sample_prompts(_fake_generate(calls), prompts, tmp_path, per_prompt=3, seed=10, fps=8, progress=False)
    assert [p.name for p in paths] == [f"{p}-{i}.mp4" for p in ("a cat", "a dog") for i in range(3)]
    assert calls == [(p, 10 + i) for p in ("a cat", "a dog") for i in range(3)]
    frames = read_video(tmp_path / "a dog-2.mp4")
    expected = _fake_generate([])("a dog", 12)
    assert frames.shape == expected.shape
    assert np.abs(frames.astype(int) - expected.astype(int)).mean() < 4  # lossy H.264
    # resume: nothing to do, then only the deleted file is made again
    calls.clear()
    sample_prompts(_fake_generate(calls), prompts, tmp_path, per_prompt=3, seed=10, progress=False)
    assert calls == []
    (tmp_path / "a cat-1.mp4").unlink()
    sample_prompts(_fake_generate(calls), prompts, tmp_path, per_prompt=3, seed=10, progress=False)
    assert calls == [("a cat", 11)]


def test_sample_prompts_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="per_prompt"):
        sample_prompts(_fake_generate([]), ["a"], tmp_path, per_prompt=0)
    with pytest.raises(ValueError, match="non-empty"):
        sample_prompts(_fake_generate([]), [" "], tmp_path)
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        sample_prompts(lambda p, s: np.zeros((4, 4), np.uint8), ["a"], tmp_path, progress=False)
    assert not list(tmp_path.glob("*.mp4"))  # a failed generation leaves no file


def test_sample_prompts_refuses_a_folder_made_with_other_settings(tmp_path: Path) -> None:
    """Resuming with another seed (or model, steps...) would mix other videos in: refused; same settings resume."""
    calls: list[tuple[str, int]] = []
    first = {"seed": 0, "steps": "1", "model": "shipped"}
    sample_prompts(_fake_generate(calls), ["a cat"], tmp_path, per_prompt=1, seed=0, progress=False, settings=first)
    assert json.loads((tmp_path / "sampling.json").read_text()) == first
    with pytest.raises(ValueError, match=r"other settings \(seed 0 -> 5, steps '1' -> '3'\)"):
        sample_prompts(_fake_generate(calls), ["a cat"], tmp_path, per_prompt=1, seed=5, progress=False,
                       settings={**first, "seed": 5, "steps": "3"})  # fmt: skip
    sample_prompts(_fake_generate(calls), ["a cat", "a dog"], tmp_path, per_prompt=1, seed=0, progress=False,
                   settings=first)  # fmt: skip
    assert calls == [("a cat", 0), ("a dog", 0)]
    # videos without a record (an older run) are reused with a warning
    (tmp_path / "sampling.json").unlink()
    with pytest.warns(UserWarning, match="2 existing video"):
        sample_prompts(_fake_generate(calls), ["a cat", "a dog"], tmp_path, per_prompt=1, seed=0, progress=False,
                       settings=first)  # fmt: skip
