"""Strict, local-only loading of ``save_pretrained`` folders: the right class and every weight, or a one-line error.

diffusers' ``from_pretrained`` fills weights missing from a folder with fresh random values and only logs a warning
(which the CLI silences), reads any folder whose config has the right keys, and words a missing local folder as a
failed download. Here a folder must hold the class asked for, and its weights must match the config exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")  # fmt: skip
KINDS = {"M4VTransformer": "an M4V transformer", "M4VWanTransformer": "an M4V (Wan) transformer",
         "AutoencoderKLLTXVideo": "a VAE", "AutoencoderKLWan": "a Wan VAE"}  # fmt: skip


def config_class(folder: str) -> str | None:
    """``_class_name`` of ``folder/config.json`` (None when unreadable)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            found = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return found.get("_class_name") if isinstance(found, dict) else None


def check_folder(folder: str, class_name: str, option: str) -> None:
    """ValueError naming ``option`` unless ``folder`` is a save_pretrained folder of ``class_name`` with weights."""
    if not os.path.exists(folder):
        raise ValueError(f"{option}: {folder} does not exist (models are read from local folders only).")
    if not os.path.isdir(folder):
        raise ValueError(f"{option}: {folder} is a file; give the folder save_pretrained wrote.")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        hint = ""
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            hint = "; it is a pipeline folder: load its transformer/ or vae/ (subfolder='transformer')"
        raise ValueError(f"{option}: {folder} is not a save_pretrained folder (no config.json){hint}.")
    found = config_class(folder)
    if found is not None and found != class_name:
        want = KINDS.get(class_name, class_name)
        raise ValueError(f"{option}: {folder} holds {KINDS.get(found, found)} ({found}), not {want}.")
    if not any(os.path.isfile(os.path.join(folder, w)) for w in WEIGHT_FILES):
        raise ValueError(f"{option}: {folder} has a config.json but no weights ({WEIGHT_FILES[0]}).")


def load_strict(
    load: Callable[..., Any], class_name: str, path: str | os.PathLike[str], option: str = "path", **kwargs: Any
) -> Any:
    """``load(path, **kwargs)`` (a diffusers ``from_pretrained``) with :func:`check_folder` first and every weight
    of the model required: missing, unexpected or mis-shaped weights are a ValueError, not a random init."""
    folder = os.fspath(path)
    if kwargs.get("subfolder"):
        folder = os.path.join(folder, kwargs.pop("subfolder"))
    check_folder(folder, class_name, option)
    want_info = kwargs.pop("output_loading_info", False)
    kwargs.setdefault("local_files_only", True)
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "newly initialized" and "pip install accelerate" lines: see below
    try:
        model, info = load(folder, output_loading_info=True, **kwargs)
    except (OSError, RuntimeError, EnvironmentError) as e:  # noqa: UP024 - diffusers raises both
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = " ".join(lines[:2])[:300] if lines else type(e).__name__
        raise ValueError(f"{option}: cannot load the weights in {folder} ({detail}).") from e
    finally:
        diffusers_logging.set_verbosity(level)
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of the wrong shape")):  # fmt: skip
        names = [k[0] if isinstance(k, tuple) else k for k in info.get(key, [])]
        if names:
            problems.append(f"{len(names)} {what} (e.g. {names[0]})")
    if problems:
        raise ValueError(
            f"{option}: the weights in {folder} do not match its config.json: {', '.join(problems)}; the folder is "
            "incomplete or from another model."
        )
    return (model, info) if want_info else model


__all__ = ["KINDS", "WEIGHT_FILES", "check_folder", "config_class", "load_strict"]
