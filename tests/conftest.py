"""Shared test helpers."""

import torch

from m4v.models import M4VTransformer, named_config


def randomize_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised (adaLN-Zero, output) weights random values so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 or name.endswith("bias") and "dt_bias" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_model(**overrides) -> M4VTransformer:
    torch.manual_seed(0)
    return randomize_(M4VTransformer(**named_config("tiny", **overrides)))
