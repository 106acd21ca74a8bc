"""Eager twins of the Triton custom ops (SSD scan, causal conv, gated RMSNorm of the MM-DiM mixer, Sec. 3.1).

The Triton kernels run inside ``torch.library`` custom ops so that ``torch.compile`` sees one opaque node per
call. Outside compilation that dispatch is pure host time: about 50 us per differentiable call on the 2-core CI
CPU against 12 us for an ``autograd.Function`` running the same functions, and at short sequences the MM-DiM
layer is host-bound (docs/performance.md). :func:`eager_function` builds that Function from the op's own
``forward`` and ``setup_context`` and a ``backward`` that calls the backward function itself rather than its
custom op; :func:`call` picks the custom op while Dynamo traces and the Function otherwise. Calls that autograd
does not record (no_grad, inference_mode, no input requiring grad) skip the Function and run the forward itself.
(The choice is made once, in the forward: the custom op's registered backward always calls the backward op,
because AOTAutograd traces it with fake tensors, and torch.compiler.is_compiling() is not True there in every
torch release.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def eager_function(
    forward: Callable[..., Any],
    setup_context: Callable[[Any, tuple[Any, ...], Any], None],
    backward: Callable[..., Any],
) -> Callable[..., Any]:
    """A callable equal to the custom op registered with these three functions: ``apply`` of an
    autograd.Function when autograd records the call, else ``forward`` itself (inference skips the Function)."""

    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):  # type: ignore[no-untyped-def, override]
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):  # type: ignore[no-untyped-def, override]
            return backward(ctx, *grads)

    EagerOp.__name__ = EagerOp.__qualname__ = f"Eager_{getattr(forward, '__name__', 'op')}"
    apply = EagerOp.apply

    def run(*inputs: Any) -> Any:
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return apply(*inputs)
        return forward(*inputs)

    run.__name__ = run.__qualname__ = EagerOp.__name__
    return run


def choose(op: Callable[..., Any], plain: Callable[..., Any]) -> Callable[..., Any]:
    """``op`` (the custom op) while torch.compile traces, ``plain`` (the same function undispatched) otherwise."""
    return op if torch.compiler.is_compiling() else plain


def call(op: Callable[..., Any], eager: Callable[..., Any], *args: Any) -> Any:
    """Run ``op(*args)`` while compiling, else ``eager(*args)`` (an :func:`eager_function`)."""
    return choose(op, eager)(*args)


__all__ = ["call", "choose", "eager_function"]
