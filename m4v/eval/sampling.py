"""Prompt suites, VBench file naming and the resumable sampling loop (paper Sec. 4.1, B.3, C.1).

VBench names a generated video ``{prompt}-{index}.mp4`` (index 0..4, five videos per prompt).  File names
are limited to 255 bytes, so a prompt longer than ``MAX_PROMPT_BYTES`` UTF-8 bytes is cut there (at a
character boundary) and ``/`` becomes ``_``; :func:`match_prompt` maps such a name back to its prompt.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

MAX_PROMPT_BYTES = 200
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
BUILTIN_PROMPTS: dict[str, Path] = {
    "vbench_custom50": PROMPTS_DIR / "vbench_custom50.txt",
    "user_study50": PROMPTS_DIR / "user_study50.txt",
}
VIDEO_EXTENSIONS = (".mp4", ".gif", ".avi", ".mov", ".mkv", ".webm")

GenerateFn = Callable[[str, int], Any]


# ----------------------------------------------------------------------------------------------
# prompt files
# ----------------------------------------------------------------------------------------------


def parse_prompt_text(text: str) -> tuple[list[str], dict[str, str]]:
    """Prompts of a prompt file: one per line; blank lines and ``#`` comments are skipped.

    A comment of the form ``# [section]`` starts a section; returns ``(prompts, section of each prompt)``.
    Duplicates are dropped (first occurrence kept).
    """
    prompts: list[str] = []
    sections: dict[str, str] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            body = line[1:].strip()
            if body.startswith("[") and body.endswith("]"):
                section = body[1:-1].strip()
            continue
        if line not in sections:
            prompts.append(line)
            sections[line] = section
    return prompts, sections


def resolve_prompt_file(spec: str | os.PathLike[str]) -> Path:
    """A built-in suite name (``vbench_custom50``, ``user_study50``) or a path -> an existing file."""
    if isinstance(spec, str) and spec in BUILTIN_PROMPTS:
        return BUILTIN_PROMPTS[spec]
    path = Path(spec)
    if not path.is_file():
        names = ", ".join(BUILTIN_PROMPTS)
        raise ValueError(f"--prompts: {str(spec)!r} is neither a file nor a built-in suite ({names}).")
    return path


def load_prompts(spec: str | os.PathLike[str]) -> list[str]:
    """Prompts of a built-in suite or a prompt file (see :func:`parse_prompt_text`)."""
    path = resolve_prompt_file(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts: cannot read {str(path)!r}: {e}") from e
    prompts, _ = parse_prompt_text(text)
    if not prompts:
        raise ValueError(f"--prompts: {str(path)!r} contains no prompts.")
    return prompts


def prompt_sections(spec: str | os.PathLike[str]) -> dict[str, str]:
    """Section (``# [name]`` header) of every prompt of a suite or prompt file."""
    return parse_prompt_text(resolve_prompt_file(spec).read_text(encoding="utf-8"))[1]


# ----------------------------------------------------------------------------------------------
# VBench naming
# ----------------------------------------------------------------------------------------------


def prompt_stem(prompt: str) -> str:
    """The prompt part of a VBench file name: ``/`` -> ``_``, cut to ``MAX_PROMPT_BYTES`` UTF-8 bytes."""
    text = prompt.strip().replace("/", "_").replace("\0", "")
    data = text.encode("utf-8")[:MAX_PROMPT_BYTES]
    return data.decode("utf-8", errors="ignore").rstrip()


def video_filename(prompt: str, index: int, ext: str = ".mp4") -> str:
    """VBench file name ``{prompt}-{index}{ext}``."""
    if index < 0:
        raise ValueError(f"index must be non-negative; got {index}.")
    stem = prompt_stem(prompt)
    if not stem:
        raise ValueError("prompt must contain at least one character that can appear in a file name.")
    return f"{stem}-{index}{ext}"


def parse_video_filename(name: str) -> tuple[str, int | None]:
    """``"a cat-3.mp4"`` -> ``("a cat", 3)``; a name without a ``-INDEX`` suffix gives ``(stem, None)``."""
    stem = os.path.splitext(os.path.basename(name))[0]
    head, sep, tail = stem.rpartition("-")
    if sep and head and tail.isdigit():
        return head, int(tail)
    return stem, None


def match_prompt(stem: str, prompts: Iterable[str]) -> str | None:
    """The prompt whose file-name stem (:func:`prompt_stem`) equals ``stem``, or None."""
    for p in prompts:
        if prompt_stem(p) == stem:
            return p
    return None


# ----------------------------------------------------------------------------------------------
# sampling loop
# ----------------------------------------------------------------------------------------------


def _dedupe(prompts: Sequence[str]) -> list[str]:
    out = list(dict.fromkeys(p.strip() for p in prompts))
    if not out or any(not p for p in out):
        raise ValueError("prompts must be a non-empty list of non-empty strings.")
    return out


def sample_prompts(
    generate_fn: GenerateFn,
    prompts: Sequence[str],
    out_dir: str | os.PathLike[str],
    per_prompt: int = 5,
    seed: int = 0,
    fps: float = 24.0,
    progress: bool = True,
    settings: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Generate ``per_prompt`` videos per prompt into ``out_dir`` with VBench naming; resumable.

    Video ``{prompt}-{i}.mp4`` is made by ``generate_fn(prompt, seed + i)``, which returns frames
    ``[F, H, W, 3]`` (uint8, or float in [0, 1]). Files that already exist are skipped (writes are atomic, so
    an interrupted run leaves no partial file). Returns the paths of all ``len(prompts) * per_prompt`` videos.
    ``settings`` (what makes the videos: model, seed, steps, sizes...) are kept in ``out_dir/sampling.json``; a
    folder whose recorded settings differ is refused rather than resumed (its videos would be other ones).
    """
    from tqdm.auto import tqdm

    from m4v.io.video import write_video

    if per_prompt < 1:
        raise ValueError(f"per_prompt must be at least 1; got {per_prompt}.")
    prompts = _dedupe(prompts)
    out = Path(out_dir)
    jobs = [(p, i, out / video_filename(p, i)) for p in prompts for i in range(per_prompt)]
    names = [j[2].name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError("two prompts map to the same file name; shorten or reword them.")
    todo = [j for j in jobs if not j[2].exists()]
    if settings is not None:
        _check_settings(out, dict(settings), reused=len(jobs) - len(todo))
    out.mkdir(parents=True, exist_ok=True)

    def record() -> None:  # after the first new video: a run that fails at once leaves its folder empty
        if settings is not None:
            tmp = out / "sampling.json.partial"
            tmp.write_text(json.dumps(dict(settings), indent=1, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, out / "sampling.json")

    if not todo:
        record()
    bar = tqdm(todo, desc="sampling", unit="video", disable=not progress, dynamic_ncols=True)
    for k, (prompt, i, path) in enumerate(bar):
        bar.set_postfix_str(f"{prompt[:40]}-{i}")
        write_video(path, generate_fn(prompt, seed + i), fps=fps)
        if k == 0:
            record()
    return [j[2] for j in jobs]


def _check_settings(out: Path, settings: dict[str, Any], reused: int) -> None:
    """Refuse to resume a folder whose videos were made with other settings; warn when they are unknown."""
    record = out / "sampling.json"
    if record.is_file():
        try:
            old = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if isinstance(old, dict):
            diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
            if diff:
                what = ", ".join(f"{k} {old.get(k)!r} -> {settings.get(k)!r}" for k in diff[:3])
                raise ValueError(f"--out: the videos in {out} were made with other settings ({what}); "
                                 "give another --out or remove them.")  # fmt: skip
            return
    if reused:
        warnings.warn(f"{reused} existing video(s) in {out} are reused; their settings were not recorded", stacklevel=3)


__all__ = [
    "BUILTIN_PROMPTS",
    "MAX_PROMPT_BYTES",
    "VIDEO_EXTENSIONS",
    "load_prompts",
    "match_prompt",
    "parse_prompt_text",
    "parse_video_filename",
    "prompt_sections",
    "prompt_stem",
    "resolve_prompt_file",
    "sample_prompts",
    "video_filename",
]
