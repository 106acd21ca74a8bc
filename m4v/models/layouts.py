"""Backbone layouts of paper Table 4: which mixer each of the single-stream blocks uses."""

from __future__ import annotations

LAYOUTS = ("full_attn", "full", "full_temp", "post_half", "pre_half", "interleaved", "parallel")


def block_mixers(layout: str, num_blocks: int) -> list[str]:
    """Mixer of each single-stream block: "attention", "mamba" or "parallel" (Mamba and attention side by side).

    full_attn: all attention (PyramidFlow).  full / full_temp: all Mamba (full_temp adds the temporal
    branch).  post_half: Mamba in the latter half.  pre_half: Mamba in the first half.  interleaved:
    attention and Mamba alternate, starting with attention.  parallel: Mamba and attention in parallel
    in every block, sharing the MLP.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    half = num_blocks // 2
    if layout == "full_attn":
        return ["attention"] * num_blocks
    if layout in ("full", "full_temp"):
        return ["mamba"] * num_blocks
    if layout == "post_half":
        return ["attention"] * half + ["mamba"] * (num_blocks - half)
    if layout == "pre_half":
        return ["mamba"] * half + ["attention"] * (num_blocks - half)
    if layout == "interleaved":
        return ["attention" if i % 2 == 0 else "mamba" for i in range(num_blocks)]
    return ["parallel"] * num_blocks
