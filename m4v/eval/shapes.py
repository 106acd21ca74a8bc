"""Moving-Shapes video analyser: recovers each object's colour, shape, size and motion from a (generated)
clip by plain image analysis, to check a model trained on the synthetic Moving Shapes data (paper D.1).

Steps (per video ``[F, H, W, 3]``):

1. every pixel gets the nearest palette colour (object colours and background colours, RGB distance), or
   none when farther than ``max_distance``;
2. the background is the background colour with the most pixels over the whole clip; pixels then closer
   to a mixture of the background and an object colour than to any pure colour (blurred or compressed
   edges) go to that object when at least half of it, else to the background;
3. for every other palette colour, the largest 4-connected component of its pixels in each frame is the
   object; the colour is an object when that component covers at least ``min_area`` of the frame in at
   least ``min_presence`` of the frames (the dataset never repeats a colour within a clip);
4. shape from two scale-free numbers, medians over frames: the fill ratio ``area / bounding-box area``
   (circle pi/4 = 0.785, square 1, triangle 1/2) and the absolute vertical skewness of the covered area
   (0 for circle and square, 0.566 for a triangle), both measured on blur-tolerant soft coverage (see
   ``_soft_measure``); the nearest of the three prototypes wins (the skewness separates small blurred
   triangles, whose fill ratio rises towards the circle's, from circles);
   frames where another object touches this one (possible occlusion) are left out when others exist;
5. size from the median (soft) bounding-box side over ``min(H, W)`` (small 0.15, big 0.30: threshold 0.225);
6. motion from the least-squares velocity of the coverage-weighted centroid: "still" when both the
   per-frame speed is below ``still_speed`` and the whole-clip travel below ``still_travel`` (fractions of
   the frame extent), else the sign of the dominant axis (y grows downwards: negative y velocity is "up");
7. the VBench temporal flickering of the whole clip (:func:`m4v.eval.metrics.temporal_flickering`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from m4v.data.moving_shapes import BACKGROUND_RGB, COLOUR_RGB
from m4v.eval.metrics import as_video_array, temporal_flickering

TRIANGLE_SKEW = 2.0 * math.sqrt(2.0) / 5.0  # |skewness| of the height of a point uniform in a triangle
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "circle": (math.pi / 4, 0.0),
    "square": (1.0, 0.0),
    "triangle": (0.5, TRIANGLE_SKEW),
}
"""Shape -> (fill ratio, |vertical skewness| of the covered area) of the ideal shape."""
PROTOTYPE_SCALE = (0.15, 0.15)  # distance units of the two features
SIZE_THRESHOLD = 0.225  # between "small" (0.15) and "big" (0.30) of min(H, W)


@dataclass
class ObjectReport:
    """What the analyser found for one object."""

    colour: str
    shape: str
    size: str
    motion: str
    fill_ratio: float
    skewness: float
    side_fraction: float
    velocity: tuple[float, float]  # pixels per frame (x, y)
    frames_present: int
    track: list[tuple[float, float] | None] = field(repr=False, default_factory=list)
    temporal_flickering: float | None = None


@dataclass
class ShapesAnalysis:
    """Background, objects and temporal flickering of one clip."""

    background: str
    objects: list[ObjectReport]
    temporal_flickering: float | None  # None for a clip of one frame (no frame pairs to compare)


def _largest_components(mask: np.ndarray) -> np.ndarray:
    """Per frame, the largest 4-connected component of ``mask`` [F, H, W] (ties: the first found).

    Labels start as pixel indices and repeatedly take the minimum over the 4 neighbours, followed by
    pointer jumping (a label is the index of a pixel of the same component, whose own label is smaller).
    """
    f, h, w = mask.shape
    big = f * h * w
    labels = np.where(mask, np.arange(big, dtype=np.int64).reshape(f, h, w), big)
    while True:
        new = labels.copy()
        np.minimum(new[:, 1:, :], labels[:, :-1, :], out=new[:, 1:, :])
        np.minimum(new[:, :-1, :], labels[:, 1:, :], out=new[:, :-1, :])
        np.minimum(new[:, :, 1:], labels[:, :, :-1], out=new[:, :, 1:])
        np.minimum(new[:, :, :-1], labels[:, :, 1:], out=new[:, :, :-1])
        new = np.where(mask, new, big)
        flat = np.append(new.ravel(), big)
        for _ in range(2):
            new = np.where(mask, flat[new], big)
            flat = np.append(new.ravel(), big)
        if np.array_equal(new, labels):
            break
        labels = new
    out = np.zeros_like(mask)
    for t in range(f):
        lab = labels[t][mask[t]]
        if lab.size == 0:
            continue
        values, counts = np.unique(lab, return_counts=True)
        out[t] = labels[t] == values[np.argmax(counts)]
    return out


def _unique_colours(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct colours of uint8 pixels [..., 3] as float64 [U, 3] and each pixel's index into them."""
    keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    uniq, inverse = np.unique(keys.ravel(), return_inverse=True)
    cols = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], -1).astype(np.float64)
    return cols, inverse.reshape(keys.shape)


def _label_colours(
    cols: np.ndarray, palette: np.ndarray, bg_index: int | None, objects: Sequence[int], max_distance: float
) -> np.ndarray:
    """Palette index of every colour [U, 3]; -1 when farther than ``max_distance`` from every candidate.

    Without ``bg_index``: the nearest palette colour. With it, a colour that lies closer (by 8 levels) to a
    segment background -> object colour than to any palette colour is an edge pixel mixing the two (blur,
    chroma subsampling): it goes to the object when its mixing weight is at least 1/2, else to the background.
    This keeps blurred rims (e.g. half-yellow on black, which is nearest to orange) out of other colours.
    """
    d2 = ((cols[:, None, :] - palette[None]) ** 2).sum(-1)
    best, dist = d2.argmin(-1), np.sqrt(d2.min(-1))
    if bg_index is not None and objects:
        bg = palette[bg_index]
        seg_dist = np.full(len(cols), np.inf)
        seg_label = np.full(len(cols), bg_index)
        for k in objects:
            d = palette[k] - bg
            t = np.clip(((cols - bg) @ d) / float(d @ d), 0.0, 1.0)
            dk = np.sqrt((((bg + t[:, None] * d) - cols) ** 2).sum(-1))
            closer = dk < seg_dist
            seg_dist = np.where(closer, dk, seg_dist)
            seg_label = np.where(closer, np.where(t >= 0.5, k, bg_index), seg_label)
        mixed = seg_dist + 8.0 < dist
        best, dist = np.where(mixed, seg_label, best), np.where(mixed, seg_dist, dist)
    return np.where(dist <= max_distance, best, -1)


def _soft_measure(
    frame: np.ndarray, comp: np.ndarray, others: np.ndarray, bg: np.ndarray, col: np.ndarray, radius: int = 1
) -> tuple[float, float, float, float, float, bool] | None:
    """Blur-tolerant geometry of one object in one frame: ``(fill, |skewness|, side, cx, cy, touching)``.

    Lengths are in pixels; ``touching`` tells whether another object comes within ``radius`` pixels (then
    one may hide part of the other).

    Coverage ``alpha`` of each pixel near the component (dilated by ``radius``, other objects excluded) is
    its colour's position on the segment background -> object colour, clipped to [0, 1]. Blur and chroma
    subsampling move coverage between neighbouring pixels but keep its sum, so area = sum(alpha), width /
    height = sums of the per-column / per-row maximum coverage, centroid = coverage-weighted mean; the
    skewness is the third standardised moment of the rows' coverage (a symmetric blur keeps the third
    central moment): 0 for circle and square, 2 sqrt(2) / 5 = 0.566 in size for a triangle.
    """
    yy, xx = np.nonzero(comp)
    if yy.size == 0:
        return None
    h, w = comp.shape
    y0, y1 = max(0, yy.min() - radius), min(h, yy.max() + 1 + radius)
    x0, x1 = max(0, xx.min() - radius), min(w, xx.max() + 1 + radius)
    roi = comp[y0:y1, x0:x1].copy()
    for _ in range(radius):
        grown = roi.copy()
        grown[1:] |= roi[:-1]
        grown[:-1] |= roi[1:]
        grown[:, 1:] |= roi[:, :-1]
        grown[:, :-1] |= roi[:, 1:]
        roi = grown
    touching = bool((roi & others[y0:y1, x0:x1]).any())
    roi &= ~others[y0:y1, x0:x1]
    d = col - bg
    alpha = np.clip(((frame[y0:y1, x0:x1].astype(np.float64) - bg) @ d) / float(d @ d), 0.0, 1.0) * roi
    area = float(alpha.sum())
    rows, cols = alpha.max(1), alpha.max(0)
    bh, bw = float(rows.sum()), float(cols.sum())
    if area <= 0 or bh <= 0 or bw <= 0:
        return None
    ys = np.arange(y0, y1) + 0.5
    xs = np.arange(x0, x1) + 0.5
    wy = alpha.sum(1)
    cy = float(wy @ ys) / area
    cx = float(alpha.sum(0) @ xs) / area
    m2 = float(wy @ (ys - cy) ** 2) / area
    m3 = float(wy @ (ys - cy) ** 3) / area
    skew = abs(m3) / m2**1.5 if m2 > 0 else 0.0
    return area / (bh * bw), skew, max(bh, bw), cx, cy, touching


def _classify_shape(fill: float, skew: float) -> str:
    def dist(p: tuple[float, float]) -> float:
        return ((fill - p[0]) / PROTOTYPE_SCALE[0]) ** 2 + ((skew - p[1]) / PROTOTYPE_SCALE[1]) ** 2

    return min(SHAPE_PROTOTYPES, key=lambda s: dist(SHAPE_PROTOTYPES[s]))


def _classify_motion(
    vx: float, vy: float, num_frames: int, height: int, width: int, still_speed: float, still_travel: float
) -> str:
    sx, sy = abs(vx) / width, abs(vy) / height
    speed = max(sx, sy)
    if speed < still_speed and speed * max(1, num_frames - 1) < still_travel:
        return "still"
    if sx >= sy:
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def analyse(
    video: Any,
    colours: Mapping[str, tuple[int, int, int]] | None = None,
    backgrounds: Mapping[str, tuple[int, int, int]] | None = None,
    max_distance: float = 100.0,
    min_area: float = 0.004,
    min_presence: float = 0.5,
    still_speed: float = 0.01,
    still_travel: float = 0.1,
    max_side: int = 128,
) -> ShapesAnalysis:
    """Analyse one clip ``[F, H, W, 3]`` (uint8 or float in [0, 1]); see the module docstring.

    ``colours`` / ``backgrounds`` default to the Moving Shapes palettes (``m4v.data.moving_shapes``).
    Frames whose short side exceeds ``max_side`` are subsampled by an integer stride (no colour mixing);
    velocities and tracks are reported in the original pixels.
    """
    colours = dict(COLOUR_RGB if colours is None else colours)
    backgrounds = dict(BACKGROUND_RGB if backgrounds is None else backgrounds)
    if not colours or not backgrounds:
        raise ValueError("colours and backgrounds must be non-empty palettes.")
    arr = as_video_array(video)
    stride = max(1, math.ceil(min(arr.shape[1:3]) / max_side))
    rgb = arr[:, ::stride, ::stride]
    if rgb.dtype != np.uint8:
        rgb = np.round(rgb * 255.0).astype(np.uint8)
    num_frames, height, width, _ = rgb.shape
    names = list(backgrounds) + [c for c in colours]
    kinds = ["bg"] * len(backgrounds) + ["obj"] * len(colours)
    palette = np.array([backgrounds[n] for n in backgrounds] + [colours[n] for n in colours], np.float32)
    cols, inverse = _unique_colours(rgb)
    pal64 = palette.astype(np.float64)
    nearest = _label_colours(cols, pal64, None, [], max_distance)[inverse]
    counts = np.bincount(nearest[nearest >= 0].ravel(), minlength=len(names))
    bg_index = int(np.argmax(counts[: len(backgrounds)]))
    background = names[bg_index]
    bg_rgb = tuple(palette[bg_index].tolist())
    obj_indices = [k for k in range(len(names)) if kinds[k] == "obj" and tuple(palette[k].tolist()) != bg_rgb]
    nearest = _label_colours(cols, pal64, bg_index, obj_indices, max_distance)[inverse]
    flicker = temporal_flickering(arr) if num_frames > 1 else None
    frame_area = height * width
    found: list[tuple[str, np.ndarray, np.ndarray]] = []  # (colour, components [F, H, W], present [F])
    for k, (name, kind) in enumerate(zip(names, kinds)):
        if kind != "obj" or tuple(palette[k].tolist()) == bg_rgb:
            continue
        # pixels of this colour: the label itself, or the background entry with the same RGB (e.g. white)
        same = [j for j in range(len(names)) if tuple(palette[j].tolist()) == tuple(palette[k].tolist())]
        mask = np.isin(nearest, same)
        if mask.sum() < min_area * frame_area * min_presence * num_frames:
            continue
        comp = _largest_components(mask)
        present = comp.sum(axis=(1, 2)) >= max(4.0, min_area * frame_area)
        if present.sum() >= min_presence * num_frames:
            found.append((name, comp, present))
    taken = np.zeros((num_frames, height, width), dtype=bool)
    for _, comp, _ in found:
        taken |= comp
    objects: list[ObjectReport] = []
    bg_vec = np.asarray(bg_rgb, np.float64)
    for name, comp, present in found:
        col = np.asarray(colours[name], np.float64)
        fills, skews, sides, track, clear = [], [], [], [], []
        ts, xs, ys = [], [], []
        for t in range(num_frames):
            m = _soft_measure(rgb[t], comp[t], taken[t] & ~comp[t], bg_vec, col) if present[t] else None
            if m is None:
                track.append(None)
                continue
            fill, skew, side, cx, cy, touching = m
            clear.append(not touching)
            fills.append(fill)
            skews.append(skew)
            sides.append(side / min(height, width))
            track.append((cx * stride, cy * stride))
            ts.append(t)
            xs.append(cx * stride)
            ys.append(cy * stride)
        if not ts:
            continue
        use = np.asarray(clear) if any(clear) else np.ones(len(clear), dtype=bool)  # prefer unoccluded frames
        fill = float(np.median(np.asarray(fills)[use]))
        skew = float(np.median(np.asarray(skews)[use]))
        side = float(np.median(np.asarray(sides)[use]))
        if len(ts) > 1:
            vx = float(np.polyfit(ts, xs, 1)[0])
            vy = float(np.polyfit(ts, ys, 1)[0])
        else:
            vx = vy = 0.0
        objects.append(
            ObjectReport(
                colour=name,
                shape=_classify_shape(fill, skew),
                size="big" if side >= SIZE_THRESHOLD else "small",
                motion=_classify_motion(
                    vx, vy, num_frames, height * stride, width * stride, still_speed, still_travel
                ),
                fill_ratio=fill,
                skewness=skew,
                side_fraction=side,
                velocity=(vx, vy),
                frames_present=len(ts),
                track=track,
                temporal_flickering=flicker,
            )
        )
    return ShapesAnalysis(background=background, objects=objects, temporal_flickering=flicker)


def analyse_video(video: Any, **kwargs: Any) -> list[ObjectReport]:
    """The objects found in one clip (see :func:`analyse` for the options)."""
    return analyse(video, **kwargs).objects


ATTRIBUTES = ("colour", "shape", "size", "motion")


def score(reports: Sequence[ObjectReport] | ShapesAnalysis, expected_meta: Mapping[str, Any]) -> dict[str, float]:
    """Per-attribute correctness of an analysis against the clip's specification (``meta``).

    Objects are matched by colour (unique within a clip). Returns ``count`` (1 if the number of objects
    found equals the number expected), ``colour`` / ``shape`` / ``size`` / ``motion`` (fraction of the
    expected objects found with that attribute right; an object not found counts as wrong), ``background``
    (only when a :class:`ShapesAnalysis` is given) and ``all`` (1 if everything is right).
    """
    objects = reports.objects if isinstance(reports, ShapesAnalysis) else list(reports)
    expected = list(expected_meta["objects"])
    if not expected:
        raise ValueError("expected_meta must list at least one object.")
    found = {o.colour: o for o in objects}
    out: dict[str, float] = {"count": float(len(objects) == len(expected))}
    for attr in ATTRIBUTES:
        ok = [e["colour"] in found and getattr(found[e["colour"]], attr) == e[attr] for e in expected]
        out[attr] = float(np.mean(ok))
    if isinstance(reports, ShapesAnalysis):
        out["background"] = float(reports.background == expected_meta["background"])
    out["all"] = float(all(v == 1.0 for v in out.values()))
    return out


def summarise(scores: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Mean of every key over many :func:`score` results (accuracy per attribute)."""
    rows = list(scores)
    if not rows:
        raise ValueError("no scores to summarise.")
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def evaluate_shapes_folder(videos_dir: str | os.PathLike[str], progress: bool = True) -> dict[str, Any]:
    """Analyse every video of a folder whose VBench-style name (``CAPTION-INDEX.mp4``) is a canonical Moving
    Shapes caption, score it against the parsed caption and summarise the accuracy per attribute.

    Videos whose caption does not parse are analysed but not scored; unreadable videos are skipped.
    """
    from tqdm.auto import tqdm

    from m4v.data.moving_shapes import parse_caption
    from m4v.eval.vbench import discover_videos
    from m4v.io.video import read_video

    entries, warnings = discover_videos(videos_dir)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    scores: list[dict[str, float]] = []
    for entry in tqdm(entries, desc="shapes", unit="video", disable=not progress, dynamic_ncols=True):
        try:
            video = read_video(entry.path)
        except ValueError as e:
            skipped.append({"file": entry.path.name, "reason": str(e)})
            continue
        result = analyse(video)
        expected = parse_caption(entry.prompt)
        row: dict[str, Any] = {
            "file": entry.path.name,
            "caption": entry.prompt,
            "background": result.background,
            "temporal_flickering": result.temporal_flickering,
            "objects": [{k: v for k, v in asdict(o).items() if k != "track"} for o in result.objects],
        }
        if expected is not None:
            row["score"] = score(result, expected)
            scores.append(row["score"])
        rows.append(row)
    if not rows:
        raise ValueError(f"--videos: none of the {len(entries)} video file(s) could be read.")
    if len(scores) < len(rows):
        warnings.append(f"{len(rows) - len(scores)} video name(s) are not canonical Moving Shapes captions")
    return {
        "videos_dir": str(videos_dir),
        "num_videos": len(rows),
        "num_scored": len(scores),
        "accuracy": summarise(scores) if scores else {},
        "mean_temporal_flickering": mean_flickering(r["temporal_flickering"] for r in rows),
        "per_video": rows,
        "skipped": skipped,
        "warnings": warnings,
    }


def mean_flickering(values: Iterable[float | None]) -> float | None:
    """Mean temporal flickering over the clips that have one (None when every clip is a single frame)."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def format_flickering(value: float | None) -> str:
    """``97.31%``, or ``n/a (one-frame videos)`` where no clip had two frames."""
    return "n/a (one-frame videos)" if value is None else f"{100 * value:.2f}%"


__all__ = [
    "ATTRIBUTES",
    "SHAPE_PROTOTYPES",
    "ObjectReport",
    "ShapesAnalysis",
    "analyse",
    "analyse_video",
    "evaluate_shapes_folder",
    "format_flickering",
    "mean_flickering",
    "score",
    "summarise",
]
