"""Mamba2 mixer: init recipe (reference-facts 3) and the whole layer against a step-by-step recurrence."""

import math

import torch
import torch.nn.functional as F

from m4v.layers.mamba2 import Mamba2Mixer


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
