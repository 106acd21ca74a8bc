"""Zigzag spatial scan paths of the MM-DiM block (paper Sec. 3.3, App. A.1, Fig. 6)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

NUM_PATHS = 8

# Paper A.1 (a)..(h): (start corner, column snake?).  A column snake goes along a column first
# ("downward first"/"upward first"); a row snake goes along a row first ("rightward first"/...).
_PATHS: tuple[tuple[str, bool], ...] = (
    ("top-left", True),  # (a) downward first, then rightward
    ("top-left", False),  # (b) rightward first, then downward
    ("bottom-left", True),  # (c) upward first, then rightward
    ("bottom-left", False),  # (d) rightward first, then upward
    ("bottom-right", True),  # (e) upward first, then leftward
    ("bottom-right", False),  # (f) leftward first, then upward
    ("top-right", True),  # (g) downward first, then leftward
    ("top-right", False),  # (h) leftward first, then downward
)


def _snake(grid: torch.Tensor) -> torch.Tensor:
    """Row-snake a grid that is already oriented: row 0 left to right, row 1 right to left, ..."""
    out = grid.clone()
    out[1::2] = out[1::2].flip(-1)
    return out.reshape(-1)


@lru_cache(maxsize=256)
def _zigzag_path_cached(h: int, w: int, k: int) -> torch.Tensor:
    corner, column_first = _PATHS[k]
    grid = torch.arange(h * w, dtype=torch.long).reshape(h, w)
    if corner.startswith("bottom"):
        grid = grid.flip(0)
    if corner.endswith("right"):
        grid = grid.flip(1)
    if column_first:
        grid = grid.t()
    return _snake(grid)


def zigzag_path(h: int, w: int, k: int) -> torch.Tensor:
    """Permutation of an h x w grid (flat index r*w + c) for scan path k = 0..7 = paper A.1 (a)..(h).

    ``seq = tokens[perm]`` gives the scan order; ``inverse_permutation(perm)`` restores it.
    """
    if h < 1 or w < 1:
        raise ValueError(f"zigzag_path: grid size must be positive, got h={h}, w={w}")
    if not 0 <= k < NUM_PATHS:
        raise ValueError(f"zigzag_path: path k must be in 0..{NUM_PATHS - 1}, got {k}")
    return _zigzag_path_cached(int(h), int(w), int(k)).clone()


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Inverse of a permutation: ``x[perm][inverse_permutation(perm)] == x``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inv


def zigzag_sequence(sizes: Sequence[tuple[int, int]], k: int) -> torch.Tensor:
    """Permutation of a sequence of frames at (possibly) different resolutions, each scanned by path k.

    Frames stay in time order (the pyramid history, then the current frame); tokens inside each
    frame follow the zigzag path. ``sizes`` are the token grids (h, w) of the frames.
    """
    parts, offset = [], 0
    for h, w in sizes:
        parts.append(zigzag_path(h, w, k) + offset)
        offset += h * w
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(parts)


def layer_path(layer_index: int) -> int:
    """Scan path used by the ``layer_index``-th MM-DiM layer: one path per layer, cycling over the 8."""
    return layer_index % NUM_PATHS
