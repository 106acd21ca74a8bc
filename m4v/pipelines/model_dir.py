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
    if not os.path.isdir(root):
        raise ValueError(f"model directory {root!r} does not exist")
    index_path = os.path.join(root, MODEL_INDEX)
    if not os.path.isfile(index_path):
        raise ValueError(f"model directory {root!r} has no {MODEL_INDEX}; it is not an {kind} model")
    try:
        with open(index_path) as f:
            index = json.load(f)
        components = {name: load(os.path.join(root, name)) for name, load in loaders.items()}
    except (OSError, json.JSONDecodeError, KeyError, RuntimeError) as e:
        raise ValueError(f"model directory {root!r} is corrupt or incomplete: {str(e).splitlines()[0]}") from None
    return index, components
