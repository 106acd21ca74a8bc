"""AdamW parameter groups and the per-stage learning-rate schedule (paper D.1: warm-up, constant or cosine)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from m4v.training.config import TrainConfig


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters exempt from weight decay: flagged ``_no_weight_decay``, biases and other 1-D tensors (norms)."""
    out = set()
    for name, p in model.named_parameters():
        if getattr(p, "_no_weight_decay", False) or p.ndim < 2 or name.endswith(".bias"):
            out.add(name)
    return out


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, exempt: Iterable[str] | None = None
) -> torch.optim.AdamW:
    """AdamW with two groups (decay / no decay). ``exempt`` is computed before FSDP sharding, which drops
    custom parameter attributes; names are unchanged by ``fully_shard``."""
    exempt = set(no_decay_names(model) if exempt is None else exempt)
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if name in exempt else decay).append(p)
    o = cfg.optim
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """LR of optimizer step ``step``: each stage's ``lr`` (default ``optim.lr``), linear warm-up over its
    ``warmup_steps`` (default ``optim.warmup_steps`` for the first stage, 0 later), then constant or a
    cosine decay to ``min_lr_ratio * lr`` over the rest of the stage."""
    index, local = cfg.stage_at(step)
    stage = cfg.stages[index]
    base = cfg.optim.lr if stage.lr is None else stage.lr
    warm = stage.warmup_steps if stage.warmup_steps is not None else (cfg.optim.warmup_steps if index == 0 else 0)
    if warm > 0 and local < warm:
        return base * (local + 1) / warm
    if cfg.optim.schedule == "constant":
        return base
    span = max(stage.steps - warm, 1)
    progress = min(max(local - warm, 0) / span, 1.0)
    floor = cfg.optim.min_lr_ratio
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
