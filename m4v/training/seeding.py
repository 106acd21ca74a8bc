"""Counter-based randomness: every random choice of training is a pure function of (seed, keys).

Making each draw depend only on the run seed, the step and the sample's index in the global batch
(not on the rank or on how many draws came before) is what makes one process and N processes see the
same numbers, and what makes resuming exact.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def derive_seed(*keys: Any) -> int:
    """A 63-bit seed from any printable keys (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(keys).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*keys: Any, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from ``keys``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def uniform(*keys: Any) -> float:
    """A float in [0, 1) determined by ``keys``."""
    return derive_seed(*keys) / float(1 << 63)


def rng_state() -> dict[str, Any]:
    """Global RNG states of this process (torch CPU/CUDA, numpy, random) for checkpoints."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
