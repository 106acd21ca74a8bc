"""Tests for m4v.ops.eager: the autograd.Function twin of a custom op, skipped where autograd records nothing."""

from __future__ import annotations

import torch

from m4v.ops import eager


def _scaled_square():  # noqa: ANN202
    """An op y = 3 x^2 written as the three functions a custom op registers; counts forward / setup calls."""
    calls = {"forward": 0, "setup": 0}

    def forward(x: torch.Tensor, scale: float) -> torch.Tensor:
        calls["forward"] += 1
        return scale * x * x

    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        calls["setup"] += 1
        ctx.save_for_backward(inputs[0])
        ctx.scale = inputs[1]

    def backward(ctx, grad):  # noqa: ANN001, ANN202
        (x,) = ctx.saved_tensors
        return grad * 2 * ctx.scale * x, None

    return eager.eager_function(forward, setup_context, backward), calls


def test_recorded_calls_run_the_function_and_its_backward() -> None:
    op, calls = _scaled_square()
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    y = op(x, 3.0)
    assert type(y.grad_fn).__name__ == "EagerOpBackward" and calls == {"forward": 1, "setup": 1}
    y.sum().backward()
    assert torch.equal(x.grad, 6.0 * x.detach())  # d(3 x^2)/dx by hand


def test_unrecorded_calls_skip_the_function() -> None:
    """no_grad, inference_mode and inputs without requires_grad: the forward alone, same values."""
    op, calls = _scaled_square()
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    want = 3.0 * x * x
    leaf = x.clone().requires_grad_(True)
    with torch.no_grad():
        a = op(leaf, 3.0)
    with torch.inference_mode():
        b = op(x, 3.0)
    c = op(x, 3.0)
    for out in (a, b, c):
        assert out.grad_fn is None and torch.equal(out, want)
    assert calls == {"forward": 3, "setup": 0}


def test_call_takes_the_custom_op_only_while_compiling(monkeypatch) -> None:  # noqa: ANN001
    picked = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    eager.call(lambda *a: picked.append("op"), lambda *a: picked.append("eager"), 1)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    eager.call(lambda *a: picked.append("op"), lambda *a: picked.append("eager"), 1)
    assert picked == ["op", "eager"]
