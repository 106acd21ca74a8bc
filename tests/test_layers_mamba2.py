"""Mamba2 mixer: init recipe (reference-facts 3) and the whole layer against a step-by-step recurrence."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import m4v.layers.mamba2 as mamba2_module
from m4v.layers.mamba2 import Mamba2Mixer, aligned_linear


def sequential_mixer(m: Mamba2Mixer, u: torch.Tensor) -> torch.Tensor:
    """The layer written token by token in float64: conv window, recurrence, gated norm, out_proj."""
    b, s, _ = u.shape
    di, g, n, H, P = m.d_inner, m.ngroups, m.d_state, m.nheads, m.headdim
    proj = u @ m.in_proj.weight.double().T
    z, xbc, dt = proj[..., :di], proj[..., di : di + m.conv_dim], proj[..., di + m.conv_dim :]
    conv = torch.zeros_like(xbc)
    for t in range(s):
        for j in range(m.d_conv):
            src = t - (m.d_conv - 1) + j
            if src >= 0:
                conv[:, t] += xbc[:, src] * m.conv_weight.double()[:, j]
    xbc = F.silu(conv + m.conv_bias.double())
    x, B, C = xbc[..., :di], xbc[..., di : di + g * n], xbc[..., di + g * n :]
    dt = F.softplus(dt + m.dt_bias.double())
    A = -torch.exp(m.A_log.double())
    y = torch.zeros(b, s, H, P, dtype=torch.float64)
    for hd in range(H):
        grp = hd // (H // g)
        h = torch.zeros(b, P, n, dtype=torch.float64)
        for t in range(s):
            xt = x[:, t, hd * P : (hd + 1) * P]
            Bt, Ct = B[:, t, grp * n : (grp + 1) * n], C[:, t, grp * n : (grp + 1) * n]
            decay = torch.exp(dt[:, t, hd] * A[hd])[:, None, None]
            h = decay * h + dt[:, t, hd, None, None] * xt[:, :, None] * Bt[:, None]
            y[:, t, hd] = (h * Ct[:, None]).sum(-1) + m.D.double()[hd] * xt
    gated = y.reshape(b, s, di) * F.silu(z)
    gs = di // g
    gg = gated.reshape(b, s, g, gs)
    normed = (gg * torch.rsqrt(gg.pow(2).mean(-1, keepdim=True) + m.norm.eps)).reshape(b, s, di)
    return (normed * m.norm.weight.double()) @ m.out_proj.weight.double().T


def test_init_recipe():
    torch.manual_seed(0)
    m = Mamba2Mixer(64, d_state=16, expand=2, headdim=8, ngroups=1)
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    A = -torch.exp(m.A_log)
    assert A.max() <= -1.0 and A.min() >= -16.0
    assert torch.equal(m.D, torch.ones_like(m.D))
    assert all(getattr(p, "_no_weight_decay", False) for p in (m.dt_bias, m.A_log, m.D))
    # log-uniform dt: log dt spread over [ln 1e-3, ln 1e-1]
    big = Mamba2Mixer(64, d_state=4, expand=64, headdim=1, ngroups=1)
    logdt = torch.log(F.softplus(big.dt_bias))
    assert abs(logdt.mean().item() - 0.5 * (math.log(1e-3) + math.log(1e-1))) < 0.3


def test_layer_matches_sequential_recurrence():
    torch.manual_seed(0)
    for groups in (1, 2):
        m = Mamba2Mixer(16, d_state=4, d_conv=4, expand=2, headdim=8, ngroups=groups, chunk_size=8).double()
        m.norm.weight.data.uniform_(0.5, 1.5)
        u = torch.randn(2, 19, 16, dtype=torch.float64)
        assert torch.allclose(m(u), sequential_mixer(m, u), rtol=1e-9, atol=1e-10)


def test_left_padding_keeps_state_zero():
    """Zero-valued, masked tokens before the sequence leave the outputs of the real tokens unchanged."""
    torch.manual_seed(0)
    m = Mamba2Mixer(16, d_state=4, expand=1, headdim=8, ngroups=2, chunk_size=4).double()
    u = torch.randn(1, 9, 16, dtype=torch.float64)
    padded = torch.cat([torch.zeros(1, 5, 16, dtype=torch.float64), u], 1)
    keep = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)], 1)
    assert torch.allclose(m(padded, keep)[:, 5:], m(u), atol=1e-12)
    # without the mask the conv bias would leak through the padding into the state
    assert not torch.allclose(m(padded)[:, 5:], m(u), atol=1e-6)


def test_aligned_linear_pads_output_rows():
    """Padded to a multiple of 8 columns: the first ones are F.linear (values and gradients), the rest zero."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, requires_grad=True)
    out = aligned_linear(x, w, b, align=8)
    assert out.shape == (3, 5, 16) and torch.equal(out[..., 13:], torch.zeros(3, 5, 3, dtype=torch.float64))
    ref = F.linear(x, w, b)
    assert torch.allclose(out[..., :13], ref, rtol=1e-13, atol=1e-13)
    g = torch.randn_like(ref)
    got = torch.autograd.grad((out[..., :13] * g).sum(), (x, w, b))
    want = torch.autograd.grad((ref * g).sum(), (x, w, b))
    for a, e in zip(got, want):
        assert torch.allclose(a, e, rtol=1e-13, atol=1e-13)
    assert aligned_linear(x, w, align=1).shape == (3, 5, 13)  # no padding asked: plain F.linear
    assert aligned_linear(x, w).shape == (3, 5, 13)  # CPU default: no padding


def test_layer_with_padded_in_proj_matches_recurrence(monkeypatch):
    """The CUDA path's padded in_proj (here forced on the CPU): same outputs and gradients as the plain layer."""
    torch.manual_seed(0)
    m = Mamba2Mixer(16, d_state=4, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=8).double()
    assert m.in_proj.out_features % 8  # 2*32 + 2*2*4 + 4 = 84 columns: padded to 88
    u = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    plain = m(u)
    g_plain = torch.autograd.grad(plain.sum(), [u, m.in_proj.weight])
    monkeypatch.setattr(mamba2_module, "aligned_linear", lambda x, w, b=None: aligned_linear(x, w, b, align=8))
    assert m.project(u).shape[-1] == 88
    padded = m(u)
    assert torch.allclose(padded, sequential_mixer(m, u.detach()), rtol=1e-9, atol=1e-10)
    g_padded = torch.autograd.grad(padded.sum(), [u, m.in_proj.weight])
    for a, e in zip(g_padded, g_plain):
        assert a.shape == e.shape and torch.allclose(a, e, rtol=1e-12, atol=1e-12)


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_layer_at_width_1920_against_float64():
    """The GPU path at the paper's width (in_proj padded 7710 -> 7712, Triton conv / SSD / gated norm) in bf16
    against the float64 torch path on the same bf16-rounded weights: issue 5's 5e-3 (output) / 1e-2 (gradients)."""
    torch.manual_seed(0)
    m = Mamba2Mixer(1920, d_state=64, expand=1, headdim=64, ngroups=30, chunk_size=256).bfloat16().double()
    u = torch.randn(2, 700, 1920, dtype=torch.float64).bfloat16().double().requires_grad_()
    g = torch.randn(2, 700, 1920, dtype=torch.float64)
    ref = m(u)
    ref_grads = torch.autograd.grad(ref, [u, m.in_proj.weight, m.conv_weight, m.dt_bias, m.out_proj.weight], g)
    mc = copy.deepcopy(m).to("cuda", torch.bfloat16)
    uc = u.detach().to("cuda", torch.bfloat16).requires_grad_()
    assert mc.project(uc).shape[-1] == 7712
    out = mc(uc)
    grads = torch.autograd.grad(
        out, [uc, mc.in_proj.weight, mc.conv_weight, mc.dt_bias, mc.out_proj.weight], g.to("cuda", torch.bfloat16)
    )
    assert _rel_rms(out, ref) < 5e-3
    for got, want in zip(grads, ref_grads):
        assert _rel_rms(got, want) < 1e-2
