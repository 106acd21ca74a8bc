"""Training checkpoints with torch.distributed.checkpoint: model, optimizer, EMA, step, RNG, data position.

``OUT/checkpoints/step-00001000/`` holds the DCP shards (``model``, ``optim``, ``ema``), one
``rng-rank{r}.pt`` per rank and ``meta.json`` (written last, so a folder without it is an incomplete
snapshot and is ignored). DCP reshards on load, so a run can resume on a different number of ranks.
Parameters that had no optimizer state when the checkpoint was written (no gradient yet) resume without any.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from m4v.training.distributed import DistInfo, barrier
from m4v.training.ema import EMA
from m4v.training.seeding import rng_state, set_rng_state

META = "meta.json"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with meta.json), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / META).is_file())


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _quiet() -> warnings.catch_warnings:
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    return ctx


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ema: EMA | None) -> dict[str, Any]:
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": msd, "optim": osd}
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = {"model": get_model_state_dict(model)}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def _keep_saved_optim_state(state: dict[str, Any], path: Path) -> None:
    """Drop the per-parameter optimizer entries that the checkpoint lacks entirely.

    ``get_state_dict`` gives a fresh optimizer state for every parameter, while a checkpoint only holds
    the parameters that had state (a gradient) when it was written; DCP would fail on the others.
    """
    if "optim" not in state:
        return
    try:
        saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except OSError as e:
        raise ValueError(f"checkpoint: {path} has no readable DCP metadata ({e}).") from e
    per_param = state["optim"]["state"]
    for fqn in list(per_param):
        if not any(f"optim.state.{fqn}.{key}" in saved for key in per_param[fqn]):
            del per_param[fqn]


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    ema: EMA | None,
    meta: dict[str, Any],
    info: DistInfo,
    keep: int | None = None,
) -> Path:
    """Collective: every rank calls it. ``meta`` (JSON) is written by rank 0 once all shards are on disk."""
    path = Path(path)
    if info.is_main:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    barrier(info)
    ctx = _quiet()
    try:
        dcp.save(_state(model, optimizer, ema), checkpoint_id=str(path))
    finally:
        ctx.__exit__(None, None, None)
    torch.save(rng_state(), path / f"rng-rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        (path / META).write_text(json.dumps(dict(meta, world_size=info.world), indent=1))
        if keep is not None:
            for old in list_checkpoints(path.parent.parent)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return path


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    ema: EMA | None,
    info: DistInfo,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint in place (collective); returns its meta."""
    path = Path(path)
    meta = read_meta(path)
    state = _state(model, optimizer, ema)
    _keep_saved_optim_state(state, path)
    ctx = _quiet()
    try:
        dcp.load(state, checkpoint_id=str(path))
    finally:
        ctx.__exit__(None, None, None)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:  # not strict: parameters left without state above stay without it
        set_optimizer_state_dict(model, optimizer, state["optim"], options=StateDictOptions(strict=False))
    if ema is not None:
        ema.load_state_dict(state["ema"])
    rng_file = path / f"rng-rank{info.rank}.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of checkpoint folder ``path``; ValueError naming the file when it is missing or damaged."""
    file = Path(path) / META
    if not file.is_file():
        raise ValueError(f"checkpoint: {path} is not a complete checkpoint (no {META}).")
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint: {file} is damaged (not readable JSON: {e}).") from e
    if not isinstance(meta, dict) or isinstance(meta.get("step"), bool) or not isinstance(meta.get("step"), int):
        raise ValueError(f"checkpoint: {file} has no step count; it was not written by m4v train or train-vae.")
    return meta


def resume_checkpoint(
    resume: str, output_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, ema: EMA | None,
    info: DistInfo,
) -> tuple[Path, dict[str, Any]] | None:
    """Load what ``checkpoint.resume`` names into the model, optimizer and EMA (collective): (folder, meta), or None.

    A checkpoint that cannot be read, or does not fit the model, raises ValueError with one line saying which and
    what to do (an earlier complete checkpoint of the run, when there is one, or ``--resume none``).
    """
    from torch.distributed.checkpoint.api import CheckpointException

    ckpt = resolve_resume(resume, output_dir)
    if ckpt is None:
        return None
    try:
        return ckpt, load_checkpoint(ckpt, model, optimizer, ema, info)
    except (RuntimeError, KeyError, EOFError, OSError, CheckpointException) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = (lines or [type(e).__name__])[-1][:200]
        damaged = any(word in str(e) for word in ("EOFError", "UnpicklingError", "unpickl", "truncated", "corrupt"))
        damaged = damaged or isinstance(e, EOFError | OSError)
        earlier = [c for c in list_checkpoints(ckpt.parent.parent) if c != ckpt and c.name < ckpt.name]
        if damaged:
            # (not "--resume none" here: it is refused in an output_dir that holds checkpoints)
            hint = f"--resume {earlier[-1]} (the one before it)" if earlier else f"another output_dir, or delete {ckpt}"
            raise ValueError(f"checkpoint: {ckpt} is damaged ({detail}); use {hint}.") from e
        raise ValueError(
            f"checkpoint: {ckpt} does not fit this model ({detail}); use --resume none with another output_dir."
        ) from e


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``auto``: the latest complete checkpoint of the run if any; ``none``: start fresh; else a path.

    ``none`` in an output_dir that already holds checkpoints is refused: the new run's checkpoints would be pruned
    against the old run's higher step numbers, and a later ``auto`` would resume the old run.
    """
    if resume in ("none", "", None):
        found = latest_checkpoint(output_dir)
        if found is not None:
            raise ValueError(
                f"checkpoint.resume: none, but {output_dir} already holds checkpoints of another run (latest "
                f"{found.name}); give a new --output-dir, or delete {Path(output_dir) / 'checkpoints'} first."
            )
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    p = Path(resume)
    if not (p / META).is_file():
        raise ValueError(f"checkpoint.resume: {p} is not a complete checkpoint folder (no {META}).")
    return p
