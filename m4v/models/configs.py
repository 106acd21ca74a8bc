"""Named transformer configurations: the paper-scale model and small ones for tests and the shipped model."""

from __future__ import annotations

import copy
from typing import Any

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # Paper scale (Sec. 3.2, A.2): PyramidFlow's miniFLUX with the 16 single-stream blocks replaced.
    # Mamba: one SSM group per head with d_state = head dim (the attention-to-Mamba mapping of D.2),
    # expand 1, so an MM-DiM block costs about one D^2 more parameters than an attention block.
    "m4v-768p": dict(
        in_channels=16,
        patch_size=2,
        width=1920,
        num_heads=30,
        num_dual_layers=8,
        num_single_layers=16,
        mlp_ratio=4.0,
        text_dim=4096,
        pooled_dim=768,
        axes_dims_rope=[16, 24, 24],
        layout="full_temp",
        ssm_d_state=64,
        ssm_expand=1,
        ssm_headdim=64,
        ssm_chunk_size=256,
    ),
    # Tiny model for tests: MiniLM text (384-d), 2 dual + 4 single blocks.
    "tiny": dict(
        in_channels=16,
        patch_size=2,
        width=64,
        num_heads=2,
        num_dual_layers=2,
        num_single_layers=4,
        mlp_ratio=4.0,
        text_dim=384,
        pooled_dim=384,
        axes_dims_rope=[8, 12, 12],
        layout="full_temp",
        ssm_d_state=32,
        ssm_expand=1,
        ssm_headdim=32,
        ssm_chunk_size=64,
    ),
}


def named_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of a named transformer config, with overrides applied."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"config: unknown named config {name!r}; choose one of {', '.join(NAMED_CONFIGS)}")
    cfg = copy.deepcopy(NAMED_CONFIGS[name])
    cfg.update(overrides)
    return cfg
