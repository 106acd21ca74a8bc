"""Exponential moving average of the trainable weights in float32 (works with FSDP2-sharded DTensors)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step from ``start_step`` on.

    Before ``start_step`` the shadow copies the weights. Shadows mirror the parameters' sharding, so
    with FSDP2 each rank keeps only its shard; :meth:`state_dict` returns (D)Tensors for DCP.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, start_step: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay: must be in [0, 1), got {decay}.")
        self.decay, self.start_step = decay, start_step
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        with torch.no_grad():
            self.shadow = {n: params[n].detach().clone().float() for n in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after the optimizer step that finished step ``step`` (0-based)."""
        params = dict(model.named_parameters())
        w = 1.0 if step < self.start_step else 1.0 - self.decay
        shadows = [_local(self.shadow[n]) for n in self.names]
        values = [_local(params[n].detach()).float() for n in self.names]
        torch._foreach_lerp_(shadows, values, w)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise ValueError(f"EMA state is missing {len(missing)} parameters (e.g. {sorted(missing)[0]}).")
        for n in self.names:
            _local(self.shadow[n]).copy_(_local(state[n]))

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, Tensor]:
        """Unsharded CPU copies (collective under FSDP2: every rank must call it)."""
        out = {}
        for n in self.names:
            t = self.shadow[n]
            out[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()
        return out
