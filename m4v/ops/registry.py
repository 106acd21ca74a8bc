"""Backend registry for the SSD scan (Mamba2 state-space duality, arXiv:2405.21060, used by M4V Sec. 3)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENV_VAR = "M4V_SSD_BACKEND"


@dataclass(frozen=True)
class SSDBackend:
    """One registered SSD implementation: a callable taking ``m4v.ops.ssd``'s arguments minus ``backend``."""

    name: str
    fn: Callable[..., object]
    available: Callable[[torch.Tensor], bool]
    priority: int


_BACKENDS: dict[str, SSDBackend] = {}


def register_ssd_backend(
    name: str,
    fn: Callable[..., object],
    *,
    available: Callable[[torch.Tensor], bool],
    priority: int,
) -> None:
    """Register (or replace) the SSD backend ``name``; higher ``priority`` wins automatic selection."""
    if not name or not isinstance(name, str):
        raise ValueError("name must be a non-empty string naming the SSD backend.")
    _BACKENDS[name] = SSDBackend(name=name, fn=fn, available=available, priority=int(priority))


def unregister_ssd_backend(name: str) -> None:
    """Remove the SSD backend ``name`` (no-op when it is not registered)."""
    _BACKENDS.pop(name, None)


def list_ssd_backends() -> list[str]:
    """Names of the registered SSD backends, highest priority first."""
    return [b.name for b in sorted(_BACKENDS.values(), key=lambda b: (-b.priority, b.name))]


def _lookup(name: str) -> SSDBackend:
    if name not in _BACKENDS:
        raise ValueError(
            f"backend must be one of the registered SSD backends {list_ssd_backends()}, got {name!r}."
        )
    return _BACKENDS[name]


def get_ssd_backend(name: str) -> Callable[..., object]:
    """The callable registered as ``name``; ValueError listing the registered names if unknown."""
    return _lookup(name).fn


def select_ssd_backend(x: torch.Tensor, backend: str | None = None) -> SSDBackend:
    """Pick a backend: explicit ``backend``, else env var M4V_SSD_BACKEND, else the best available one.

    An explicitly requested backend (argument or env var) that is not available for ``x`` raises
    ValueError instead of silently falling back. The env var values "" and "auto" mean automatic.
    """
    source = "backend"
    if backend is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env.lower() != "auto":
            backend, source = env, ENV_VAR
    if backend is not None:
        chosen = _lookup(backend)
        if not chosen.available(x):
            raise ValueError(
                f"{source} names SSD backend {backend!r}, which is not available for an input on "
                f"device {x.device} with dtype {x.dtype}; use one of {list_ssd_backends()} that supports it."
            )
        return chosen
    for name in list_ssd_backends():
        cand = _BACKENDS[name]
        if cand.available(x):
            return cand
    raise ValueError(
        f"no registered SSD backend {list_ssd_backends()} is available for an input on device {x.device}."
    )
