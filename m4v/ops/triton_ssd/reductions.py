"""Sum combine function shared by the SSD kernels' reductions and prefix sums (paper Sec. 3.3 chunk sums).

Kernels call ``tl.reduce`` / ``tl.associative_scan`` with ``SUM`` rather than ``tl.sum`` / ``tl.cumsum`` so
that they also run under TRITON_INTERPRET=1 when triton.language was imported before the variable was
set (the interpreter only patches builtins). The standard library's own combine function, when present,
keeps the interpreter on its vectorised path; a local one is the fallback.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


SUM = getattr(getattr(tl, "standard", None), "_sum_combine", _add)
