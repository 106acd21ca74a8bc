"""Host-side helpers of the Triton launchers of the MM-DiM mixer ops (Sec. 3.1): plain integer math, the
interpreter flag and cached launches (:class:`CachedLaunch`).

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` wrappers (a few microseconds a call
on the host); a launch computes several of them, so the launchers use these plain versions instead.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors through numpy). Read at every call: the
    tests set it and reload the kernel modules after other modules imported this one."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive b."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n, for n >= 1 (as ``triton.next_power_of_2``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# ----------------------------------------------------------------------------------------------
# cached launches
# ----------------------------------------------------------------------------------------------

# Off by default until tests/test_ops_triton_host.py's GPU test and profile_op_host.py have run on a GPU with it
# (docs/performance.md, "Cached launches"); M4V_TRITON_FAST_LAUNCH=1 turns it on.
FAST_LAUNCH: dict[str, bool] = {"enabled": os.environ.get("M4V_TRITON_FAST_LAUNCH", "0") == "1"}
_MAX_ENTRIES = 4096
_LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages"})  # compile options, not kernel parameters


class CachedLaunch:
    """``kernel[grid](*args, **kwargs)`` of a ``@triton.jit`` kernel, with its compiled kernel reused.

    ``JITFunction.run`` recomputes the specialisation of every argument at each launch, 28-39 us on the H100
    host for a kernel of 40 arguments against 9 us for the compiled kernel's own launcher
    (``benchmarks/profile_op_host.py``); the SSD forward makes four launches and the backward five. The first call
    of a signature goes through ``JITFunction.run``, which compiles (or finds) the kernel, launches it and returns
    it; later calls with the same signature launch that compiled kernel directly. The signature is finer than
    Triton's own specialisation key: every integer / float / bool / None argument by value, every tensor by dtype,
    16-byte alignment of its address and device, the keyword arguments (constexprs, num_warps, num_stages) and the
    grid. Interpreted kernels (TRITON_INTERPRET=1) and Triton builds without ``CompiledKernel[grid]`` always take
    the plain path; so does everything unless ``FAST_LAUNCH["enabled"]`` (env ``M4V_TRITON_FAST_LAUNCH=1``).
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.names: list[str] = list(getattr(kernel, "arg_names", []))
        self.runners: dict[tuple, Callable[..., None]] = {}
        self.plain_calls = 0  # launches through JITFunction.run (first of a signature, or fast path off)

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        return functools.partial(self.launch, grid)

    def launch(self, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
        if not FAST_LAUNCH["enabled"] or not self.names:
            self.plain_calls += 1
            return self.kernel[grid](*args, **kwargs)
        try:
            key = _signature(grid, args, kwargs)
            runner = self.runners.get(key)
        except TypeError:  # an unhashable argument: no signature, plain launch
            self.plain_calls += 1
            return self.kernel[grid](*args, **kwargs)
        if runner is not None:
            return runner(*args, *[kwargs[n] for n in self.names[len(args) :]])
        self.plain_calls += 1
        compiled = self.kernel[grid](*args, **kwargs)
        if set(self.names[len(args) :]) != set(kwargs) - _LAUNCH_OPTIONS:
            return compiled  # defaulted parameters or other launch options: this call keeps the plain path
        if compiled is not None and hasattr(compiled, "__getitem__"):
            if len(self.runners) >= _MAX_ENTRIES:
                self.runners.clear()
            grid3 = (tuple(grid) + (1, 1))[:3]
            self.runners[key] = compiled[grid3]
        return compiled


def _signature(grid: tuple[int, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple:
    parts: list[Any] = [tuple(grid)]
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((a.dtype, a.data_ptr() % 16 == 0, a.get_device()))
        else:
            parts.append((type(a), a))
    parts.append(tuple(kwargs.items()))
    return tuple(parts)


__all__ = ["FAST_LAUNCH", "CachedLaunch", "cdiv", "interpreting", "next_pow2"]
