"""Shared helpers for benchmarks: environment record, timing, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch


def environment() -> dict:
    commit = os.environ.get("M4V_COMMIT", "")
    if not commit:
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            commit = out.stdout.strip() if out.returncode == 0 else ""
        except Exception:  # noqa: BLE001 - no git on the machine
            pass
    switches = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("M4V_") and k != "M4V_COMMIT"]
    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "command": " ".join([*switches, os.path.basename(sys.executable), *sys.argv]),  # M4V_* switches first
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def bench(fn: Callable[[], object], warmup: int = 3, rep: int = 10) -> float:
    """Median milliseconds of fn() with CUDA events (host timer on CPU)."""
    if torch.cuda.is_available():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(rep):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
    else:
        import time

        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    return times[len(times) // 2]


def peak_memory(fn: Callable[[], object]) -> float:
    """Peak GiB allocated during fn() above what was allocated before."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def write_json(path: str | None, data: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
