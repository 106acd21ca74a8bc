"""Graceful stop of a training run on SIGTERM / SIGINT: finish the step, checkpoint, export, exit.

A scheduler that pre-empts a job (SLURM, Kubernetes, a lent GPU machine) sends SIGTERM and waits a little
before killing it; a user presses Ctrl-C. Either way the loop should not lose the steps since the last
checkpoint: ``GracefulStop`` records the signal, the loop ends after the step in flight exactly as at a time
limit (metrics row, resumable checkpoint, ``final/`` export), and ``m4v train`` exits with 128 + the signal
number. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from m4v.training.distributed import DistInfo

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block, so that cleanup code (``m4v prepare`` removing what it
    half wrote) runs as on Ctrl-C instead of the process ending at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_finite_loss(loss: float, step: int, lr: float, out: Any) -> None:
    """Stop a diverged run: a NaN or infinite loss raises ValueError (``m4v train`` exits 2 with its one line).

    Nothing is written for the diverged step: no checkpoint, no ``final/`` export, so the run's last checkpoint is
    the last good state. Checked on the loss every step already brings to the host (no extra sync).
    """
    if math.isfinite(loss):
        return
    raise ValueError(
        f"training diverged: the loss is {loss} at step {step + 1} (learning rate {lr:.3g}); nothing was saved "
        f"for it (the last checkpoint in {out}/checkpoints is the last good state). Lower optim.lr or set "
        "optim.grad_clip > 0, then resume."
    )


class GracefulStop:
    """Context manager: while active, SIGTERM / SIGINT set ``signum`` instead of ending the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        """The signal's name (SIGTERM, SIGINT), or "" before one came."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("%s: stopping after this step (checkpoint and final export); Ctrl-C again interrupts at once",
                       self.name)


def report_stop(stop: GracefulStop, time_limit: float | None, step: int, end: int) -> None:
    """Log why a run ended at ``step`` before ``end``: the signal, else the time limit."""
    why = stop.name if stop.requested else f"time limit of {time_limit:.3g} min"
    logger.info("%s: stopped at step %d of %d (checkpoint written; resume with checkpoint.resume=auto)", why, step, end)


def should_stop(deadline: float | None, stop: GracefulStop, info: DistInfo) -> bool:
    """True once ``time.monotonic()`` passed ``deadline`` or a stop signal came, on any rank.

    Collective when distributed (every rank must leave the loop after the same step: one scalar all-reduce beside the
    loss all-reduce both loops already do each step); one process needs no sync.
    """
    flag = stop.requested or (deadline is not None and time.monotonic() >= deadline)
    if not info.distributed:
        return flag
    t = torch.tensor([float(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
