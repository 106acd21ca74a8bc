"""VBench-style evaluation of a folder of generated videos and VBench's headline scores (paper Sec. 4.1,
B.1 Table 6, C.1).

Headline formula (Vchitect/VBench ``scripts/constant.py`` and ``scripts/cal_final_score.py``, unchanged at
commit 45e79ec): every dimension score ``s`` is min-max normalised, ``(s - min) / (max - min)``, and
multiplied by its weight (dynamic degree 0.5, all others 1); Quality = weighted mean over the 7 quality
dimensions (sum of weighted normalised scores / sum of weights), Semantic = the same over the 9 semantic
dimensions, Total = (4 * Quality + 1 * Semantic) / 5.  The min / max constants are in ``NORMALIZATION``.

Which implementation measures each dimension is described in :mod:`m4v.eval.metrics`; network versions
replace the weight-free proxies when their weights are given.  Imaging quality (MUSIQ) and the semantic
dimensions other than overall consistency are not implemented, so Quality / Semantic / Total are reported
only when every dimension is present (e.g. when the caller supplies them); otherwise the "partial" scores
over the available dimensions are reported and labelled as such.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m4v.eval import metrics as M
from m4v.eval.sampling import (
    VIDEO_EXTENSIONS,
    load_prompts,
    parse_video_filename,
    prompt_sections,
    prompt_stem,
)

QUALITY_DIMENSIONS: tuple[str, ...] = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "aesthetic_quality",
    "imaging_quality",
    "dynamic_degree",
)
SEMANTIC_DIMENSIONS: tuple[str, ...] = (
    "object_class",
    "multiple_objects",
    "human_action",
    "color",
    "spatial_relationship",
    "scene",
    "appearance_style",
    "temporal_style",
    "overall_consistency",
)
C1_DIMENSIONS: tuple[str, ...] = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "aesthetic_quality",
    "imaging_quality",
    "overall_consistency",
)
"""The seven metrics of the paper's fast protocol (C.1); Table 4's "Avg. Score" is their arithmetic mean."""

NORMALIZATION: dict[str, tuple[float, float]] = {
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
    "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0),
    "human_action": (0.0, 1.0),
    "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0),
    "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364),
    "overall_consistency": (0.0, 0.364),
}
"""VBench's official (min, max) per dimension (``NORMALIZE_DIC`` in ``scripts/constant.py``)."""

DIMENSION_WEIGHT: dict[str, float] = {d: 1.0 for d in NORMALIZATION} | {"dynamic_degree": 0.5}
QUALITY_WEIGHT = 4.0
SEMANTIC_WEIGHT = 1.0

VBENCH_PROMPT_LISTS: dict[str, tuple[str, ...]] = {
    "subject_consistency": ("subject_consistency", "dynamic_degree", "motion_smoothness"),
    "scene": ("scene", "background_consistency"),
    "temporal_flickering": ("temporal_flickering",),
    "overall_consistency": ("overall_consistency", "aesthetic_quality", "imaging_quality"),
}
"""VBench per-dimension prompt list -> the dimensions VBench evaluates on it (``VBench_full_info.json``)."""


@dataclass(frozen=True)
class MetricInfo:
    """One way of measuring a VBench dimension."""

    dimension: str
    source: str
    frame_weighted: bool  # aggregate over all frames of all videos (VBench's consistency dimensions)
    needs: str = ""  # "", "clip", "clip_text", "dino", "aesthetic"


METRICS: dict[str, MetricInfo] = {
    "subject_consistency_dino": MetricInfo("subject_consistency", "DINO features (VBench)", True, "dino"),
    "subject_consistency_proxy": MetricInfo(
        "subject_consistency", "proxy: translation-aligned frame correlation", True
    ),
    "background_consistency_clip": MetricInfo(
        "background_consistency", "CLIP image features (VBench)", True, "clip"
    ),
    "background_consistency_proxy": MetricInfo(
        "background_consistency", "proxy: RGB-histogram cosine", True
    ),
    "temporal_flickering": MetricInfo("temporal_flickering", "exact VBench formula", False),
    "motion_smoothness_proxy": MetricInfo(
        "motion_smoothness", "proxy: block-matching interpolation instead of AMT", False
    ),
    "dynamic_degree_proxy": MetricInfo("dynamic_degree", "proxy: block-matching flow instead of RAFT", False),
    "aesthetic_quality_clip": MetricInfo("aesthetic_quality", "CLIP + aesthetic head (VBench)", False, "aesthetic"),
    "overall_consistency_clip": MetricInfo(
        "overall_consistency", "CLIP text-frame cosine (ViCLIP substitute)", False, "clip_text"
    ),
}
"""Metric key -> dimension, description and requirement; for each dimension the first available key in
this order is the one used for the headline scores."""


# ----------------------------------------------------------------------------------------------
# headline scores
# ----------------------------------------------------------------------------------------------


def normalised_score(dimension: str, value: float) -> float:
    """``(value - min) / (max - min) * weight`` with VBench's constants."""
    if dimension not in NORMALIZATION:
        raise ValueError(f"unknown VBench dimension {dimension!r}; choose from {', '.join(NORMALIZATION)}.")
    lo, hi = NORMALIZATION[dimension]
    return (float(value) - lo) / (hi - lo) * DIMENSION_WEIGHT[dimension]


def _weighted_mean(normalised: Mapping[str, float], dims: Sequence[str]) -> float | None:
    present = [d for d in dims if d in normalised]
    if not present:
        return None
    return sum(normalised[d] for d in present) / sum(DIMENSION_WEIGHT[d] for d in present)


def vbench_scores(dimensions: Mapping[str, float]) -> dict[str, Any]:
    """VBench Quality / Semantic / Total from raw dimension scores (fractions in [0, 1], as VBench reports).

    Returns ``normalised`` (weighted normalised score per given dimension), ``quality_score``,
    ``semantic_score`` and ``total_score`` (None unless all their dimensions are given), the
    ``partial_quality_score`` / ``partial_semantic_score`` over the dimensions given, and the ``missing_*``
    dimension lists.
    """
    unknown = [d for d in dimensions if d not in NORMALIZATION]
    if unknown:
        raise ValueError(f"unknown VBench dimension(s) {unknown}; choose from {', '.join(NORMALIZATION)}.")
    normalised = {d: normalised_score(d, v) for d, v in dimensions.items()}
    missing_q = [d for d in QUALITY_DIMENSIONS if d not in normalised]
    missing_s = [d for d in SEMANTIC_DIMENSIONS if d not in normalised]
    quality = _weighted_mean(normalised, QUALITY_DIMENSIONS) if not missing_q else None
    semantic = _weighted_mean(normalised, SEMANTIC_DIMENSIONS) if not missing_s else None
    total = None
    if quality is not None and semantic is not None:
        total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return {
        "normalised": normalised,
        "quality_score": quality,
        "semantic_score": semantic,
        "total_score": total,
        "partial_quality_score": _weighted_mean(normalised, QUALITY_DIMENSIONS),
        "partial_semantic_score": _weighted_mean(normalised, SEMANTIC_DIMENSIONS),
        "missing_quality": missing_q,
        "missing_semantic": missing_s,
    }


def c1_average(dimensions: Mapping[str, float]) -> dict[str, Any]:
    """The fast protocol's "Avg. Score" (C.1, Table 4): arithmetic mean of the seven C.1 metrics.

    Returns ``{"average": mean or None if any is missing, "partial_average": mean of those present,
    "missing": [...]}``.
    """
    present = [d for d in C1_DIMENSIONS if d in dimensions]
    missing = [d for d in C1_DIMENSIONS if d not in dimensions]
    partial = float(np.mean([dimensions[d] for d in present])) if present else None
    return {"average": None if missing else partial, "partial_average": partial, "missing": missing}


# ----------------------------------------------------------------------------------------------
# folder discovery
# ----------------------------------------------------------------------------------------------


@dataclass
class VideoEntry:
    """A video file with the prompt recovered from its VBench name."""

    path: Path
    prompt: str
    index: int | None
    section: str = ""
    matched: bool = True


def discover_videos(
    videos_dir: str | os.PathLike[str], prompts: str | os.PathLike[str] | Sequence[str] | None = None
) -> tuple[list[VideoEntry], list[str]]:
    """Video files of a folder (sorted by name) with their prompts; returns ``(entries, warnings)``.

    ``prompts`` (a built-in suite name, a prompt file or a list) maps the ``PROMPT-INDEX`` file names back
    to full prompts (see :func:`m4v.eval.sampling.prompt_stem`); names that match no prompt keep the text of
    their file name and produce a warning.
    """
    sections: dict[str, str] = {}
    if prompts is None:
        prompt_list: list[str] = []
    elif isinstance(prompts, (str, os.PathLike)):
        prompt_list = load_prompts(prompts)
        sections = prompt_sections(prompts)
    else:
        prompt_list = [str(p).strip() for p in prompts]
    folder = Path(videos_dir)
    if not folder.is_dir():
        raise ValueError(f"--videos: {str(folder)!r} is not a directory.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
        raise ValueError(f"--videos: no video files ({', '.join(VIDEO_EXTENSIONS)}) in {str(folder)!r}.")
    by_stem: dict[str, str] = {}
    for p in prompt_list:
        by_stem.setdefault(prompt_stem(p), p)
    entries: list[VideoEntry] = []
    unmatched: list[str] = []
    for f in files:
        stem, index = parse_video_filename(f.name)
        prompt = by_stem.get(stem)
        matched = prompt is not None or not prompt_list
        if prompt is None:
            prompt = stem
            if prompt_list:
                unmatched.append(f.name)
        entries.append(VideoEntry(f, prompt, index, sections.get(prompt, ""), matched))
    warnings = []
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        warnings.append(f"{len(unmatched)} video(s) match no prompt of the prompt list: {shown}")
    return entries, warnings


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------


@dataclass
class Encoders:
    """Optional networks for the non-proxy metrics (VBench: DINO ViT-B/16 for subject consistency, CLIP
    ViT-B/32 for background consistency, CLIP ViT-L/14 under the aesthetic head)."""

    clip: M.ClipEncoder | None = None
    dino: M.DinoEncoder | None = None
    aesthetic: M.AestheticHead | None = None
    aesthetic_clip: M.ClipEncoder | None = None  # CLIP under the aesthetic head; default: ``clip``

    @property
    def head_clip(self) -> M.ClipEncoder | None:
        return self.aesthetic_clip if self.aesthetic_clip is not None else self.clip

    def available(self, need: str) -> bool:
        if need == "":
            return True
        if need == "clip":
            return self.clip is not None
        if need == "clip_text":
            return self.clip is not None and self.clip.tokenizer is not None
        if need == "dino":
            return self.dino is not None
        if need == "aesthetic":
            return self.head_clip is not None and self.aesthetic is not None
        raise ValueError(f"unknown requirement {need!r}")


def load_encoders(
    clip_dir: str | os.PathLike[str] | None = None,
    dino_dir: str | os.PathLike[str] | None = None,
    aesthetic_path: str | os.PathLike[str] | None = None,
    aesthetic_clip_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> Encoders:
    """Load whichever networks were given (local folders / files only)."""
    if aesthetic_path is not None and clip_dir is None and aesthetic_clip_dir is None:
        raise ValueError("--aesthetic needs --clip or --aesthetic-clip (the head scores CLIP image embeddings).")
    if aesthetic_clip_dir is not None and aesthetic_path is None:
        raise ValueError("--aesthetic-clip is only used with --aesthetic.")
    enc = Encoders(
        clip=M.ClipEncoder(clip_dir, device=device) if clip_dir is not None else None,
        dino=M.DinoEncoder(dino_dir, device=device) if dino_dir is not None else None,
        aesthetic=M.AestheticHead(aesthetic_path) if aesthetic_path is not None else None,
        aesthetic_clip=M.ClipEncoder(aesthetic_clip_dir, device=device) if aesthetic_clip_dir is not None else None,
    )
    head_clip = enc.head_clip
    if enc.aesthetic is not None and head_clip is not None and enc.aesthetic.in_dim != head_clip.dim:
        raise ValueError(
            f"--aesthetic: the head expects {enc.aesthetic.in_dim}-d embeddings but the CLIP model gives "
            f"{head_clip.dim}-d."
        )
    return enc


@dataclass
class VideoScores:
    """Per-video metric values; ``frames`` holds (sum, count) of per-frame scores of frame-weighted metrics."""

    values: dict[str, float] = field(default_factory=dict)
    frames: dict[str, tuple[float, int]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def _compute(key: str, video: np.ndarray, prompt: str, fps: float, enc: Encoders) -> float | np.ndarray:
    if key == "temporal_flickering":
        return M.temporal_flickering(video)
    if key == "motion_smoothness_proxy":
        return M.motion_smoothness_proxy(video)
    if key == "dynamic_degree_proxy":
        return float(M.dynamic_degree_proxy(video, fps=fps))
    if key == "subject_consistency_proxy":
        return M.subject_consistency_proxy_scores(video)
    if key == "background_consistency_proxy":
        return M.background_consistency_proxy_scores(video)
    if key == "subject_consistency_dino":
        assert enc.dino is not None
        return M.subject_consistency(video, enc.dino)
    if key == "background_consistency_clip":
        assert enc.clip is not None
        return M.background_consistency(video, enc.clip)
    if key == "overall_consistency_clip":
        assert enc.clip is not None
        return M.overall_consistency(video, prompt, enc.clip)
    if key == "aesthetic_quality_clip":
        head_clip = enc.head_clip
        assert head_clip is not None and enc.aesthetic is not None
        return M.aesthetic_quality(video, head_clip, enc.aesthetic)
    raise ValueError(f"unknown metric {key!r}")


def score_video(
    video: Any, prompt: str, fps: float = 8.0, encoders: Encoders | None = None, keys: Sequence[str] | None = None
) -> VideoScores:
    """All available metrics (or ``keys``) of one video ``[F, H, W, 3]``; failures are recorded, not raised."""
    enc = encoders or Encoders()
    arr = M.as_video_array(video)
    out = VideoScores()
    for key in keys if keys is not None else METRICS:
        info = METRICS[key]
        if not enc.available(info.needs):
            continue
        try:
            value = _compute(key, arr, prompt, fps, enc)
        except (ValueError, RuntimeError) as e:
            out.errors[key] = str(e)
            continue
        if info.frame_weighted:
            scores = np.asarray(value, dtype=np.float64)
            out.frames[key] = (float(scores.sum()), int(scores.size))
            out.values[key] = float(scores.mean())
        else:
            out.values[key] = float(value)
    return out


def _keys_for(entry: VideoEntry, subsets: bool) -> list[str]:
    if not subsets:
        return list(METRICS)
    dims = VBENCH_PROMPT_LISTS.get(entry.section, ())
    return [k for k, info in METRICS.items() if info.dimension in dims]


def aggregate(per_video: Sequence[VideoScores]) -> dict[str, dict[str, Any]]:
    """Dimension value of every metric over videos: frame-weighted for consistency, else the video mean."""
    out: dict[str, dict[str, Any]] = {}
    for key, info in METRICS.items():
        have = [v for v in per_video if key in v.values]
        if not have:
            continue
        if info.frame_weighted:
            total = sum(v.frames[key][0] for v in have)
            count = sum(v.frames[key][1] for v in have)
            value = total / count
        else:
            value = float(np.mean([v.values[key] for v in have]))
        out[key] = {"dimension": info.dimension, "source": info.source, "value": value, "num_videos": len(have)}
    return out


def dimension_scores(metric_values: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each dimension, the value of its preferred available metric (network before proxy)."""
    out: dict[str, dict[str, Any]] = {}
    for key, info in METRICS.items():
        if key in metric_values and info.dimension not in out:
            m = metric_values[key]
            out[info.dimension] = {"value": m["value"], "metric": key, "source": info.source}
    return out


def evaluate_entries(
    entries: Sequence[VideoEntry],
    encoders: Encoders | None = None,
    subsets: bool = False,
    default_fps: float = 8.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Read and score every entry; unreadable videos are skipped and listed. Returns the report dict."""
    from tqdm.auto import tqdm

    from m4v.io.video import probe_video, read_video

    enc = encoders or Encoders()
    per_video: list[VideoScores] = []
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    bar = tqdm(entries, desc="vbench", unit="video", disable=not progress, dynamic_ncols=True)
    for entry in bar:
        bar.set_postfix_str(entry.path.name[:40])
        try:
            video = read_video(entry.path)
            fps = probe_video(entry.path).fps
        except ValueError as e:
            skipped.append({"file": entry.path.name, "reason": str(e)})
            continue
        if not (fps > 0 and math.isfinite(fps)):
            fps = default_fps
        scores = score_video(video, entry.prompt, fps, enc, _keys_for(entry, subsets))
        per_video.append(scores)
        rows.append(
            {
                "file": entry.path.name,
                "prompt": entry.prompt,
                "index": entry.index,
                "section": entry.section,
                "frames": int(video.shape[0]),
                "fps": fps,
                "scores": scores.values,
                "errors": scores.errors,
            }
        )
    if not per_video:
        raise ValueError(f"--videos: none of the {len(entries)} video file(s) could be read.")
    metric_values = aggregate(per_video)
    dims = dimension_scores(metric_values)
    raw = {d: v["value"] for d, v in dims.items()}
    return {
        "num_videos": len(per_video),
        "skipped": skipped,
        "metrics": metric_values,
        "dimensions": dims,
        "vbench": vbench_scores(raw),
        "c1": c1_average(raw),
        "per_video": rows,
        "not_implemented": ["imaging_quality (MUSIQ)"]
        + [d for d in SEMANTIC_DIMENSIONS if d != "overall_consistency"],
    }


def evaluate_folder(
    videos_dir: str | os.PathLike[str],
    prompts: str | os.PathLike[str] | Sequence[str] | None = None,
    clip_dir: str | os.PathLike[str] | None = None,
    dino_dir: str | os.PathLike[str] | None = None,
    aesthetic_path: str | os.PathLike[str] | None = None,
    aesthetic_clip_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    subsets: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every video of ``videos_dir`` (VBench ``PROMPT-INDEX.mp4`` names) -> report dict.

    ``subsets=True`` follows VBench's standard mode: each dimension only on videos whose prompt comes from
    the VBench list of that dimension (the ``# [list]`` sections of the prompt file); by default every
    metric runs on every video (VBench's custom-prompt mode, as in the paper's fast protocol).
    """
    entries, warnings = discover_videos(videos_dir, prompts)
    encoders = load_encoders(clip_dir, dino_dir, aesthetic_path, aesthetic_clip_dir, device=device)
    if encoders.clip is not None and encoders.clip.tokenizer is None:
        warnings.append("the CLIP folder has no tokenizer: overall consistency is skipped")
    report = evaluate_entries(entries, encoders, subsets=subsets, progress=progress)
    report["videos_dir"] = str(videos_dir)
    report["warnings"] = warnings
    return report


__all__ = [
    "C1_DIMENSIONS",
    "DIMENSION_WEIGHT",
    "METRICS",
    "NORMALIZATION",
    "QUALITY_DIMENSIONS",
    "QUALITY_WEIGHT",
    "SEMANTIC_DIMENSIONS",
    "SEMANTIC_WEIGHT",
    "VBENCH_PROMPT_LISTS",
    "Encoders",
    "MetricInfo",
    "VideoEntry",
    "VideoScores",
    "aggregate",
    "c1_average",
    "dimension_scores",
    "discover_videos",
    "evaluate_entries",
    "evaluate_folder",
    "load_encoders",
    "normalised_score",
    "score_video",
    "vbench_scores",
]
