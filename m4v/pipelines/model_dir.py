"""Reading a saved model directory (model_index.json + component folders) with one-line errors, nothing downloaded."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

MODEL_INDEX = "model_index.json"


def load_model_dir(
    path: str | os.PathLike, loaders: dict[str, Callable[[str], Any]], kind: str = "M4V"
) -> tuple[dict, dict[str, Any]]:
    """(model_index, {component: loader(root/component)}); a missing, foreign or corrupt folder is a ValueError."""
    root = os.fspath(path)
    if os.path.isfile(root):
        raise ValueError(f"model directory {root!r} is a file; give the model's folder")
    if not os.path.isdir(root):
        raise ValueError(f"model directory {root!r} does not exist")
    index_path = os.path.join(root, MODEL_INDEX)
    if not os.path.isfile(index_path):
        raise ValueError(f"model directory {root!r} has no {MODEL_INDEX}; it is not an {kind} model")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"model directory {root!r}: {MODEL_INDEX} is not readable JSON ({e})") from None
    if not isinstance(index, dict):
        raise ValueError(f"model directory {root!r}: {MODEL_INDEX} must hold a JSON object, got {type(index).__name__}")
    for name in loaders:
        if not os.path.isdir(os.path.join(root, name)):
            raise ValueError(f"model directory {root!r} is incomplete: it has no {name}/ folder")
    try:
        components = {name: load(os.path.join(root, name)) for name, load in loaders.items()}
    except (OSError, json.JSONDecodeError, KeyError, RuntimeError) as e:
        raise ValueError(f"model directory {root!r} is corrupt or incomplete: {str(e).splitlines()[0]}") from None
    return index, components


def index_size(index: dict, root: str, default: tuple[int, int]) -> tuple[int, int]:
    """``default_size`` of a model_index.json: [height, width], two positive integers."""
    size = index.get("default_size", list(default))
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(_positive_int(v) for v in size)):
        raise ValueError(f"model directory {root!r}: {MODEL_INDEX} default_size must be [height, width], got {size!r}")
    return int(size[0]), int(size[1])


def index_frames(index: dict, root: str, default: int) -> int:
    """``default_frames`` of a model_index.json: a positive integer."""
    frames = index.get("default_frames", default)
    if not _positive_int(frames):
        raise ValueError(f"model directory {root!r}: {MODEL_INDEX} default_frames must be a positive integer, "
                         f"got {frames!r}")  # fmt: skip
    return int(frames)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def resolve_dtype(dtype: Any) -> Any:
    """A torch dtype from a dtype or its name ("bfloat16", "torch.float16"); ValueError for anything else."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    found = getattr(torch, name, None) if isinstance(dtype, str) else None
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(f"torch_dtype: must be a floating torch dtype such as torch.bfloat16, got {dtype!r}")
    return found
