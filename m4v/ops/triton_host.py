"""Host-side helpers of the Triton launchers of the MM-DiM mixer ops (Sec. 3.1): plain integer math and the
interpreter flag.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` wrappers (a few microseconds a call
on the host); a launch computes several of them, so the launchers use these plain versions instead.
"""

from __future__ import annotations

import os


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


__all__ = ["cdiv", "interpreting", "next_pow2"]
