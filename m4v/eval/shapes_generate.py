"""Generation mode of the Moving-Shapes evaluation (paper D.1): a model generates the held-out prompts, the
analyser of :mod:`m4v.eval.shapes` reads every video back and scores it against the prompt's specification.

The prompts are :func:`m4v.data.moving_shapes.heldout_prompts`: every held-out (colour, shape) pair x every
motion x every background, big objects, ``seeds`` seeds each (45 prompts).  Video ``(prompt, seed)`` is written
as ``CAPTION-SEED.mp4`` (VBench naming, H.264 through :func:`m4v.io.video.write_video`) and analysed after
reading it back, so a resumed run (existing files are reused) scores exactly what a fresh run scores.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from m4v.eval.shapes import analyse, format_flickering, mean_flickering, score, summarise

GenerateFn = Callable[[str, int], Any]
"""``generate_fn(prompt, seed)`` -> frames ``[F, H, W, 3]`` (uint8, or float in [0, 1])."""
HEADLINE = ("colour", "shape", "motion")
"""The attributes the generation report leads with (size and background are reported too)."""
DEFAULT_STEPS = "20"


def select_prompts(items: Sequence[Mapping[str, Any]], limit: int | None = None) -> list[dict[str, Any]]:
    """Items (``{"prompt", "seed", "meta"}``) of ``limit`` distinct prompts, each with all its seeds, in list order.

    The subset is fixed: the first ``limit`` positions of ``numpy.random.default_rng(0).permutation(P)`` over the
    ``P`` distinct prompts (pairs, motions and backgrounds mixed, the same every run); ``None`` keeps all.
    """
    prompts = list(dict.fromkeys(str(it["prompt"]) for it in items))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit: must be at least 1, got {limit}.")
        if limit < len(prompts):
            order = np.random.default_rng(0).permutation(len(prompts))[:limit]
            prompts = [prompts[k] for k in sorted(order)]
    keep = set(prompts)
    return [dict(it) for it in items if it["prompt"] in keep]


def _summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "num_videos": len(rows),
        "accuracy": summarise(r["score"] for r in rows),
        "mean_temporal_flickering": mean_flickering(r["temporal_flickering"] for r in rows),
    }


def _breakdown(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Accuracy per held-out pair, per motion and per background (of the prompt's first object)."""
    keys: dict[str, Callable[[Mapping[str, Any]], str]] = {
        "pair": lambda r: f"{r['meta']['objects'][0]['colour']} {r['meta']['objects'][0]['shape']}",
        "motion": lambda r: r["meta"]["objects"][0]["motion"],
        "background": lambda r: r["meta"]["background"],
    }
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, key in keys.items():
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for r in rows:
            groups.setdefault(key(r), []).append(r)
        out[name] = {k: _summary(g) for k, g in groups.items()}
    return out


def evaluate_generated(
    generate_fn: GenerateFn,
    items: Sequence[Mapping[str, Any]],
    videos_dir: str | os.PathLike[str] | None,
    fps: float = 24.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate (or reuse) ``CAPTION-SEED.mp4`` in ``videos_dir`` for every item, analyse and score it.

    ``videos_dir=None``: analyse the generated frames directly, without the H.264 file (no FFmpeg needed).

    ``items`` are ``{"prompt", "seed", "meta"}`` dicts (:func:`m4v.data.moving_shapes.heldout_prompts`); the
    score is against ``meta``. An existing file is reused (resume); one that cannot be read is generated
    again. Returns the report: ``accuracy`` (:func:`m4v.eval.shapes.summarise` of all videos),
    ``mean_temporal_flickering``, ``breakdown`` (per pair / motion / background), ``per_prompt`` (each with
    its seeds' videos, objects found and scores), ``generated`` / ``reused`` counts, ``skipped``, ``warnings``.
    """
    from tqdm.auto import tqdm

    from m4v.eval.sampling import video_filename
    from m4v.io.video import _to_uint8_frames, read_video, write_video

    if not items:
        raise ValueError("items: no prompts to evaluate.")
    out = Path(videos_dir) if videos_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    jobs = [(dict(it), Path(out or "") / video_filename(str(it["prompt"]), int(it["seed"]))) for it in items]
    names = [path.name for _, path in jobs]
    if len(set(names)) != len(names):
        raise ValueError("items: two (prompt, seed) pairs map to the same file name.")
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    generated = reused = 0
    bar = tqdm(jobs, desc="shapes", unit="video", disable=not progress, dynamic_ncols=True)
    for item, path in bar:
        video = None
        if out is None:
            video = _to_uint8_frames(generate_fn(str(item["prompt"]), int(item["seed"])))
            generated += 1
        elif path.exists():
            try:
                video = read_video(path)
                reused += 1
            except ValueError:
                video = None
        if video is None:
            write_video(path, generate_fn(str(item["prompt"]), int(item["seed"])), fps=fps)
            generated += 1
            try:
                video = read_video(path)
            except ValueError as e:
                skipped.append({"file": path.name, "reason": str(e)})
                continue
        result = analyse(video)
        rows.append(
            {
                "file": path.name,
                "prompt": item["prompt"],
                "seed": int(item["seed"]),
                "meta": item["meta"],
                "background": result.background,
                "temporal_flickering": result.temporal_flickering,
                "objects": [{k: v for k, v in asdict(o).items() if k != "track"} for o in result.objects],
                "score": score(result, item["meta"]),
            }
        )
        acc = summarise(r["score"] for r in rows)
        bar.set_postfix_str(" ".join(f"{k[:3]} {100 * acc[k]:.0f}%" for k in HEADLINE))
    if not rows:
        raise ValueError(f"none of the {len(jobs)} generated video(s) could be read back from {str(out)!r}.")
    warnings: list[str] = []
    if reused:
        warnings.append(f"{reused} video(s) already in {str(out)!r} were reused, not generated again")
    per_prompt: list[dict[str, Any]] = []
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append(r)
    for prompt, group in by_prompt.items():
        videos = [{k: v for k, v in r.items() if k not in ("prompt", "meta")} for r in group]
        per_prompt.append({"prompt": prompt, "meta": group[0]["meta"], **_summary(group), "videos": videos})
    return {
        "num_prompts": len(per_prompt),
        **_summary(rows),
        "generated": generated,
        "reused": reused,
        "breakdown": _breakdown(rows),
        "per_prompt": per_prompt,
        "skipped": skipped,
        "warnings": warnings,
    }


def stage_steps(text: str, stages: int, name: str) -> list[int]:
    """``"20"`` or ``"20,20,20"`` -> one positive step count per pyramid stage."""
    from m4v.generate_cli import parse_steps

    steps = parse_steps(text, name)
    steps = steps * stages if len(steps) == 1 else steps
    if len(steps) != stages:
        raise ValueError(f"{name}: give 1 or {stages} values (one per pyramid stage), got {len(steps)}")
    return steps


def pipeline_generate_fn(
    pipe: Any, call_kwargs: Mapping[str, Any], batch_size: int = 1, order: Sequence[tuple[str, int]] = ()
) -> GenerateFn:
    """``generate_fn`` of an :class:`~m4v.pipelines.M4VPipeline`: seed ``s`` uses a CPU generator seeded with ``s``
    (the same video as ``m4v generate PROMPT --seed s`` with the same settings).

    With ``batch_size > 1`` and ``order`` (the ``(prompt, seed)`` pairs in the order they will be asked for), a
    request generates it together with the next ``batch_size - 1`` pairs of ``order`` in one batched pipeline call
    (one generator per video, so each video has the noise it has alone) and hands those out from a cache.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"--batch-size: must be at least 1, got {batch_size}.")
    queue = [(str(p), int(s)) for p, s in order]
    position = {key: i for i, key in enumerate(queue)}
    cache: dict[tuple[str, int], Any] = {}

    def generate(prompt: str, seed: int) -> Any:
        key = (prompt, seed)
        if key not in cache:
            i = position.get(key)
            keys = [key] if i is None else [k for k in queue[i : i + batch_size] if k not in cache]
            gens = [torch.Generator("cpu").manual_seed(s) for _, s in keys]
            frames = pipe([p for p, _ in keys], generator=gens, **call_kwargs).frames
            cache.update(zip(keys, frames))
        return cache.pop(key)

    return generate


def _model_generate_fn(
    model_dir: str | os.PathLike[str],
    seeds: int,
    steps: str,
    video_steps: str | None,
    guidance: float | None,
    video_guidance: float | None,
    device: str,
    dtype: str,
    limit: int | None,
    batch_size: int = 1,
    self_quality_guidance: float = 0.0,
    sqg_start_frame: int | None = None,
) -> tuple[GenerateFn, list[dict[str, Any]], dict[str, Any]]:
    """Check the options, load the pipeline; returns ``(generate_fn, held-out items, settings)``."""
    import torch

    from m4v.data.moving_shapes import heldout_prompts
    from m4v.generate_cli import DTYPES, parse_steps, resolve_device, sqg_kwargs
    from m4v.pipelines import M4VPipeline
    from m4v.pipelines.pipeline_wan import is_wan_model_dir

    root = os.fspath(model_dir)
    if not os.path.isdir(root):
        raise ValueError(f"--model: folder {root!r} does not exist.")
    if is_wan_model_dir(root):
        raise ValueError(f"--model: {root!r} is a Wan2.1-family model; this evaluation runs M4V (PyramidFlow) models.")
    if seeds < 1:
        raise ValueError(f"--seeds: must be at least 1, got {seeds}.")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: unknown dtype {dtype!r}; choose float32, bfloat16 or float16.")
    for name, g in (("--guidance", guidance), ("--video-guidance", video_guidance)):
        if g is not None and g < 0:
            raise ValueError(f"{name}: must be >= 0, got {g}.")
    if batch_size < 1:
        raise ValueError(f"--batch-size: must be at least 1, got {batch_size}.")
    sqg_kwargs(self_quality_guidance, sqg_start_frame, 2**31)  # values checked before the model loads
    parse_steps(steps, "--steps")  # checked before the model loads; expanded to the stages below
    if video_steps:
        parse_steps(video_steps, "--video-steps")
    items = select_prompts(heldout_prompts(seeds_per_prompt=seeds), limit)
    torch_device = resolve_device(device)
    pipe = M4VPipeline.from_pretrained(root)
    stages = pipe.scheduler.config.num_stages
    first = stage_steps(steps, stages, "--steps")
    later = stage_steps(video_steps, stages, "--video-steps") if video_steps else [max(1, s // 2) for s in first]
    pipe.to(torch_device)
    if pipe.transformer.dtype != getattr(torch, DTYPES[dtype]):
        pipe.transformer.to(getattr(torch, DTYPES[dtype]))
    pipe.set_progress_bar_config(disable=True)
    height, width = (int(v) for v in pipe.default_size)
    kwargs: dict[str, Any] = dict(
        height=height, width=width, num_frames=int(pipe.default_frames),
        num_inference_steps=first, video_num_inference_steps=later,
    )
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if video_guidance is not None:
        kwargs["video_guidance_scale"] = video_guidance
    sqg = sqg_kwargs(self_quality_guidance, sqg_start_frame, pipe.vae.num_latent_frames(kwargs["num_frames"]))
    kwargs.update(sqg)
    settings = {
        "seeds": seeds, "limit": limit, "height": height, "width": width, "num_frames": int(pipe.default_frames),
        "steps": first, "video_steps": later,
        "guidance": pipe.default_guidance[0] if guidance is None else guidance,
        "video_guidance": pipe.default_guidance[1] if video_guidance is None else video_guidance,
        "device": str(torch_device), "dtype": DTYPES[dtype], "batch_size": batch_size,
        "self_quality_guidance": sqg.get("self_quality_guidance", 0.0), "sqg_start_frame": sqg.get("sqg_start_frame"),
    }
    order = [(str(it["prompt"]), int(it["seed"])) for it in items]
    return pipeline_generate_fn(pipe, kwargs, batch_size, order), items, settings


def evaluate_model(
    model_dir: str | os.PathLike[str],
    seeds: int = 2,
    steps: str = DEFAULT_STEPS,
    video_steps: str | None = None,
    guidance: float | None = None,
    video_guidance: float | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    videos_out: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    progress: bool = True,
    frames_out: str | os.PathLike[str] | None = None,
    in_memory: bool = False,
    batch_size: int = 1,
    self_quality_guidance: float = 0.0,
    sqg_start_frame: int | None = None,
) -> dict[str, Any]:
    """The generation mode end to end: load ``M4VPipeline.from_pretrained(model_dir)``, generate the held-out
    prompts at the model's default size and frame count, and :func:`evaluate_generated` them.

    ``steps`` are the Euler steps per pyramid stage of the first latent frame (later frames: ``video_steps``,
    default half), as in ``m4v generate``. Videos go to ``videos_out`` (kept, resumable) or a temporary folder.
    With ``frames_out`` the videos are only generated, their frames saved there (:func:`save_frames`) and
    nothing is scored (a GPU machine without FFmpeg); :func:`evaluate_frames` scores them later.
    ``in_memory`` scores the generated frames directly, without the H.264 round trip (no FFmpeg needed).
    ``batch_size`` videos are generated per pipeline call (each with its own seed's noise).
    ``self_quality_guidance`` > 0 turns on paper E.3 from latent frame ``sqg_start_frame`` (default 8) on.
    """
    root = os.fspath(model_dir)
    generate, items, settings = _model_generate_fn(
        root, seeds, steps, video_steps, guidance, video_guidance, device, dtype, limit, batch_size,
        self_quality_guidance, sqg_start_frame,
    )
    if frames_out is not None:
        return save_frames(generate, items, settings, root, frames_out, progress=progress)
    if in_memory:
        report = evaluate_generated(generate, items, None, progress=progress)
        return {"mode": "generate", "model": root, "videos_dir": None, "in_memory": True, "settings": settings,
                **report}
    report = _evaluate_to_files(generate, items, videos_out, progress)
    return {"mode": "generate", "model": root, "settings": settings, **report}


def _evaluate_to_files(
    generate: GenerateFn, items: Sequence[Mapping[str, Any]], videos_out: str | os.PathLike[str] | None, progress: bool
) -> dict[str, Any]:
    """:func:`evaluate_generated` into ``videos_out`` (kept) or a temporary folder; adds ``videos_dir``."""
    if videos_out is not None:
        report = evaluate_generated(generate, items, videos_out, progress=progress)
        return {"videos_dir": os.fspath(videos_out), **report}
    with tempfile.TemporaryDirectory(prefix="m4v-shapes-") as tmp:
        return {"videos_dir": None, **evaluate_generated(generate, items, tmp, progress=progress)}


def save_frames(
    generate_fn: GenerateFn,
    items: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    model: str,
    path: str | os.PathLike[str],
    progress: bool = True,
) -> dict[str, Any]:
    """Generate every item and write the uint8 frames, items and settings to one compressed ``.npz``."""
    import json

    from tqdm.auto import tqdm

    from m4v.io.video import _to_uint8_frames

    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"--frames-out: must be a .npz file, got {path!r}.")
    arrays: dict[str, np.ndarray] = {}
    for k, item in enumerate(tqdm(items, desc="shapes", unit="video", disable=not progress, dynamic_ncols=True)):
        arrays[f"video_{k:05d}"] = _to_uint8_frames(generate_fn(str(item["prompt"]), int(item["seed"])))
    index = {"model": model, "settings": dict(settings), "items": [dict(it) for it in items]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path[: -len(".npz")] + ".partial.npz"
    np.savez_compressed(tmp, index=np.array(json.dumps(index)), **arrays)
    os.replace(tmp, path)
    return {"mode": "frames", "model": model, "frames": path, "num_videos": len(items), "settings": dict(settings)}


def evaluate_frames(
    path: str | os.PathLike[str], videos_out: str | os.PathLike[str] | None = None, progress: bool = True
) -> dict[str, Any]:
    """Score a :func:`save_frames` file exactly as :func:`evaluate_model` scores a fresh run (the frames go
    through the same H.264 file and read-back)."""
    import json

    path = os.fspath(path)
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        index = json.loads(str(data["index"]))
        if not isinstance(index, dict) or not {"model", "settings", "items"} <= set(index):
            raise ValueError("its index lacks model / settings / items")
        frames = {(str(it["prompt"]), int(it["seed"])): f"video_{k:05d}" for k, it in enumerate(index["items"])}
        missing = sorted(set(frames.values()) - set(data.files))
        if missing:
            raise ValueError(f"{len(missing)} video array(s) missing, e.g. {missing[0]}")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"--frames: {path!r} is not a frames file written by --frames-out ({e}).") from e

    def generate(prompt: str, seed: int) -> np.ndarray:
        return data[frames[(prompt, seed)]]

    report = _evaluate_to_files(generate, index["items"], videos_out, progress)
    return {"mode": "generate", "model": index["model"], "frames": path, "settings": index["settings"], **report}


def format_report(report: Mapping[str, Any]) -> str:
    """Plain-text summary of an :func:`evaluate_model` / :func:`evaluate_generated` report."""
    acc = report["accuracy"]
    s = report.get("settings", {})
    head = f"Moving-Shapes generation eval: {report['num_videos']} video(s) of {report['num_prompts']} held-out prompts"
    if s:
        head += (
            f", model {report['model']}, {s['seeds']} seed(s), {s['height']}x{s['width']}, {s['num_frames']} frames, "
            f"steps {','.join(map(str, s['steps']))} (later frames {','.join(map(str, s['video_steps']))})"
        )
        if s.get("guidance") is not None:
            head += f", guidance {s['guidance']:g} (later frames {s['video_guidance']:g})"
        if s.get("self_quality_guidance"):
            head += f", self-quality guidance {s['self_quality_guidance']:g} from latent frame {s['sqg_start_frame']}"
    lines = [
        head,
        "accuracy: " + ", ".join(f"{k} {100 * acc[k]:.1f}%" for k in HEADLINE)
        + "  (" + ", ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items() if k not in HEADLINE) + ")",
        f"mean temporal flickering: {format_flickering(report['mean_temporal_flickering'])}",
    ]
    for group, table in report["breakdown"].items():
        for key, row in table.items():
            a = row["accuracy"]
            lines.append(
                f"  {group} {key}: " + ", ".join(f"{k} {100 * a[k]:.0f}%" for k in HEADLINE)
                + f", flickering {format_flickering(row['mean_temporal_flickering'])} ({row['num_videos']} videos)"
            )
    if report.get("videos_dir"):
        lines.append(f"videos in {report['videos_dir']} ({report['generated']} generated, {report['reused']} reused)")
    for sk in report["skipped"]:
        lines.append(f"skipped {sk['file']}: {sk['reason']}")
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_STEPS",
    "HEADLINE",
    "GenerateFn",
    "evaluate_frames",
    "evaluate_generated",
    "evaluate_model",
    "format_report",
    "pipeline_generate_fn",
    "save_frames",
    "select_prompts",
    "stage_steps",
]
