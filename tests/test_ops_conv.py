"""Tests for the depthwise causal conv1d (m4v.ops.causal_conv1d) against a hand-written loop."""

from __future__ import annotations

import math

import pytest
import torch

from m4v.ops import causal_conv1d

F64 = torch.float64


def loop_conv(x, weight, bias=None, activation=None, seq_mask=None):
    """Reference: explicit loops over batch, time, channel and tap, in float64."""
    b, l, d = x.shape
    k = weight.shape[1]
    out = torch.zeros(b, l, d, dtype=F64)
    for bi in range(b):
        for t in range(l):
            for c in range(d):
                acc = 0.0 if bias is None else float(bias[c])
                for j in range(k):
                    src = t - (k - 1) + j
                    if src >= 0 and (seq_mask is None or bool(seq_mask[bi, src])):
                        acc += float(weight[c, j]) * float(x[bi, src, c])
                if activation == "silu":
                    acc = acc / (1.0 + math.exp(-acc))
                if seq_mask is not None and not bool(seq_mask[bi, t]):
                    acc = 0.0
                out[bi, t, c] = acc
    return out


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize(
    "b,l,d,k,use_bias,activation",
    [
        (2, 9, 3, 4, True, None),
        (2, 9, 3, 4, False, "silu"),
        (1, 3, 2, 4, True, "silu"),  # shorter than the kernel
        (1, 6, 4, 1, True, None),  # pointwise
        (1, 1, 2, 3, False, "swish"),
    ],
)
def test_matches_loop(b, l, d, k, use_bias, activation):
    x, w = rand(b, l, d, seed=0), rand(d, k, seed=1)
    bias = rand(d, seed=2) if use_bias else None
    out = causal_conv1d(x, w, bias, activation=activation)
    ref = loop_conv(x, w, bias, "silu" if activation == "swish" else activation)
    assert out.shape == (b, l, d) and out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_causality():
    x, w = rand(1, 12, 3, seed=3), rand(3, 4, seed=4)
    base = causal_conv1d(x, w, activation="silu")
    x2 = x.clone()
    x2[:, 7:] += 10.0
    out = causal_conv1d(x2, w, activation="silu")
    assert torch.equal(out[:, :7], base[:, :7])
    assert not torch.allclose(out[:, 7], base[:, 7])


def test_seq_mask():
    x, w, bias = rand(2, 8, 3, seed=5), rand(3, 4, seed=6), rand(3, seed=7)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    out = causal_conv1d(x, w, bias, activation="silu", seq_mask=mask)
    torch.testing.assert_close(out, loop_conv(x, w, bias, "silu", mask), rtol=1e-12, atol=1e-12)
    # A left-padded sequence equals the unpadded one run on its own.
    alone = causal_conv1d(x[:1, 2:], w, bias, activation="silu")
    torch.testing.assert_close(out[:1, 2:], alone, rtol=1e-12, atol=1e-12)


def test_float32_and_bf16_dtype_kept():
    x, w, bias = rand(2, 10, 4, seed=8), rand(4, 4, seed=9), rand(4, seed=10)
    ref = loop_conv(x, w, bias, "silu")
    out32 = causal_conv1d(x.float(), w.float(), bias.float(), activation="silu")
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)
    out16 = causal_conv1d(x.bfloat16(), w.float(), bias.float(), activation="silu")
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), ref, rtol=5e-2, atol=5e-2)


def test_gradcheck():
    x, w, bias = rand(1, 5, 2, seed=11), rand(2, 3, seed=12), rand(2, seed=13)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, bias)]
    assert torch.autograd.gradcheck(lambda a, b, c: causal_conv1d(a, b, c, activation="silu"), leaves)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"weight": torch.zeros(4, 3)}, "weight"),
        ({"bias": torch.zeros(2)}, "bias"),
        ({"activation": "relu"}, "activation"),
        ({"seq_mask": torch.ones(2, 4)}, "seq_mask"),
    ],
)
def test_bad_arguments(kwargs, field):
    args = {"x": torch.zeros(2, 5, 3), "weight": torch.zeros(3, 4), **kwargs}
    with pytest.raises(ValueError, match=field):
        causal_conv1d(**args)
