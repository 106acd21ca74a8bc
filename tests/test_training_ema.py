"""EMA of the weights in float32 (training loop of paper D.1)."""

from __future__ import annotations

import pytest
import torch

from m4v.training.ema import EMA


def test_ema_follows_the_recurrence():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)  # frozen parameters are not tracked
    ema = EMA(model, decay=0.8, start_step=2)
    assert "1.bias" not in ema.names and len(ema.names) == 3
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, step)
        for n, p in model.named_parameters():
            if n in ref:
                w = 1.0 if step < 2 else 0.2  # a copy before start_step
                ref[n] = (1 - w) * ref[n] + w * p.detach().double()
    for n in ema.names:
        torch.testing.assert_close(ema.shadow[n].double(), ref[n], atol=1e-6, rtol=1e-6)
        assert ema.shadow[n].dtype == torch.float32
    other = EMA(model, decay=0.8)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.names)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({})
    with pytest.raises(ValueError, match="ema.decay"):
        EMA(model, decay=1.0)
