"""Output folders of the commands that write many files (train, train-vae, prepare, convert, sample)."""

from __future__ import annotations

import os
from pathlib import Path


def check_output_folder(path: str | os.PathLike[str], name: str) -> Path:
    """``path`` as a Path if it is, or can become, a writable folder; ValueError naming the option ``name`` else.

    Checked before any work starts, so that a bad folder fails at once instead of after training: ``path`` must not
    be a file, nor lie under one, and its nearest existing ancestor must be writable. Nothing is created.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{name}: {str(p)!r} exists and is a file, not a folder.")
    anchor = p
    while not anchor.exists():
        if anchor.parent == anchor:
            break
        anchor = anchor.parent
    if anchor.exists() and not anchor.is_dir():
        raise ValueError(f"{name}: {str(p)!r} cannot be created: {str(anchor)!r} is a file.")
    if anchor.exists() and not os.access(anchor, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: {str(anchor)!r} is not writable.")
    return p


def check_output_file(path: str | os.PathLike[str] | None, name: str) -> Path | None:
    """``path`` as a Path if a file can be written there (its missing parent folders may be created later);
    ValueError naming ``name`` if it is a folder or cannot be created. None stays None."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{name}: {str(p)!r} is a folder; give a file name.")
    check_output_folder(p.parent, name)
    return p


__all__ = ["check_output_file", "check_output_folder"]
