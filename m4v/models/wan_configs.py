"""Named M4V (Wan2.1) sizes and their mixer FLOPs / parameter counts (paper Sec. 4.1, 4.2, Table 2).

Wan2.1 sizes are those of diffusers' ``WanTransformer3DModel`` (its defaults are the 14B model:
40 heads x 128, ffn 13824, 40 layers, text_dim 4096, freq_dim 256, patch (1, 2, 2), in/out 16) and
of the Wan2.1-T2V-1.3B transformer config (12 heads x 128 = 1536, ffn 8960, 30 layers).  Wan's
VAE compresses 4x in time and 8x in space (frames = 1 + 4k), its text encoder is UMT5-XXL (4096-d,
512 tokens).  MM-DiM: one SSM group per head, d_state = head dim 128 (the attention-to-Mamba
mapping of paper D.2), SSM head dim 64, expand 1.

FLOPs follow m4v/eval/flops.py: multiply-add = 2 FLOPs, one forward pass, batch 1, no CFG, mixer
layers only.  Self-attention: 8*N*D^2 + 4*N^2*D over the N video tokens.  MM-DiM: the Mamba2
layer of flops.py over the re-composed sequence (prompt twice, one register per frame, the video)
plus the temporal branch (q/k/v of every, possibly pooled, token 6*T*P*D^2 and the folded
attention 4*T^2*P*D).  Cross-attention (identical in both layouts) is reported separately:
q and o over the video 4*N*D^2, k and v over Wan's 512-token context 4*L*D^2, scores and values
4*N*L*D.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

WAN_NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "wan-1.3b": dict(
        family="wan", layout="mmdim", patch_size=[1, 2, 2], in_channels=16, out_channels=16, dim=1536,
        num_heads=12, ffn_dim=8960, num_layers=30, text_dim=4096, text_len=512, freq_dim=256, eps=1e-6,
        cross_attn_norm=True, ssm_headdim=64, ssm_expand=1,
    ),
    "wan-14b": dict(
        family="wan", layout="mmdim", patch_size=[1, 2, 2], in_channels=16, out_channels=16, dim=5120,
        num_heads=40, ffn_dim=13824, num_layers=40, text_dim=4096, text_len=512, freq_dim=256, eps=1e-6,
        cross_attn_norm=True, ssm_headdim=64, ssm_expand=1,
    ),
    # Tests: MiniLM text (384-d), Wan VAE latents (16 channels), 3 blocks (zigzag paths 0, 1, 2).
    "wan-tiny": dict(
        family="wan", layout="mmdim", patch_size=[1, 2, 2], in_channels=16, out_channels=16, dim=64,
        num_heads=4, ffn_dim=128, num_layers=3, text_dim=384, text_len=64, freq_dim=32, eps=1e-6,
        cross_attn_norm=True, ssm_expand=1, ssm_chunk_size=32,
    ),
}

VAE_TEMPORAL, VAE_SPATIAL = 4, 8
WAN_CONTEXT_LEN = 512
PAPER_TABLE2 = {"Wan2.1": 1700, "M4V (Wan2.1)": 1210}  # seconds, 720 x 1280 x 81 frames


def wan_named_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of a named Wan config with overrides applied."""
    if name not in WAN_NAMED_CONFIGS:
        raise ValueError(f"config: unknown Wan config {name!r}; choose one of {', '.join(WAN_NAMED_CONFIGS)}")
    cfg = copy.deepcopy(WAN_NAMED_CONFIGS[name])
    cfg.update(overrides)
    return cfg


def resolved_wan_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A named config with every M4VWanTransformer default filled in."""
    import inspect

    from m4v.models.wan import M4VWanTransformer

    sig = inspect.signature(M4VWanTransformer.__init__)
    cfg = {k: v.default for k, v in sig.parameters.items() if v.default is not inspect.Parameter.empty}
    cfg.update(wan_named_config(name, **overrides))
    return cfg


def latent_grid(
    height: int, width: int, num_frames: int, patch: tuple[int, int, int] = (1, 2, 2)
) -> tuple[int, int, int]:
    """Token grid (T, H, W) of a video through Wan's VAE (4x time, 8x space) and the patch embedding."""
    T = (num_frames - 1) // VAE_TEMPORAL + 1
    return T // patch[0], height // VAE_SPATIAL // patch[1], width // VAE_SPATIAL // patch[2]


def temporal_branch_flops(grid: tuple[int, int, int], d: int, pool: int = 1) -> float:
    """q/k/v projections of every (pooled) token plus the causal attention over frames folded to width P*D."""
    T, H, W = grid
    P = (H // pool) * (W // pool)
    return 6.0 * T * P * d * d + 4.0 * T * T * P * d


def cross_attention_flops(n: int, context: int, d: int) -> float:
    return 4.0 * n * d * d + 4.0 * context * d * d + 4.0 * n * context * d


def wan_mixer_flops(cfg: dict[str, Any], grid: tuple[int, int, int], prompt_len: int = 128,
                    context_len: int = WAN_CONTEXT_LEN) -> tuple[float, float]:
    """(self-mixer FLOPs, cross-attention FLOPs) of all layers for one forward pass over ``grid``."""
    from m4v.eval.flops import attention_flops, mamba_flops

    T, H, W = grid
    n, d, layers = T * H * W, cfg["dim"], cfg["num_layers"]
    if cfg["layout"] == "attention":
        mixer = attention_flops(n, d)
    else:
        from m4v.models.wan import ssm_kwargs

        k = ssm_kwargs(cfg)
        ssm = dict(ssm_expand=k["expand"], ssm_headdim=k["headdim"], ssm_d_conv=k["d_conv"],
                   ssm_ngroups=k["ngroups"], ssm_d_state=k["d_state"])
        seq = (2 if cfg["text_recomposition"] else 1) * prompt_len + n + (T if cfg["registers"] else 0)
        mixer = mamba_flops(seq, d, ssm)
        if cfg["temporal_branch"]:
            mixer += temporal_branch_flops(grid, d, cfg["temporal_pool"])
    return layers * mixer, layers * cross_attention_flops(n, context_len, d)


def count_wan_parameters(cfg: dict[str, Any]) -> int:
    """Parameters of the real module, built on the meta device."""
    from m4v.models.wan import M4VWanTransformer

    with torch.device("meta"):
        model = M4VWanTransformer(**cfg)
    return sum(p.numel() for p in model.parameters())


def wan_flops_rows(
    height: int,
    width: int,
    num_frames: int,
    models: tuple[str, ...] = ("wan-1.3b", "wan-14b"),
    layouts: tuple[str, ...] = ("attention", "mmdim"),
    prompt_len: int = 128,
    context_len: int = WAN_CONTEXT_LEN,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """One row per (model, layout): token counts, self-mixer and cross-attention TFLOPs, parameters (B)."""
    if (num_frames - 1) % VAE_TEMPORAL or num_frames < 1:
        raise ValueError(f"num_frames: {num_frames} is not 1 + {VAE_TEMPORAL}k (Wan's VAE)")
    if height % (VAE_SPATIAL * 2) or width % (VAE_SPATIAL * 2) or height < 16 or width < 16:
        raise ValueError(f"height/width: {height}x{width} must be multiples of {VAE_SPATIAL * 2}")
    rows = []
    for name in models:
        for layout in layouts:
            cfg = resolved_wan_config(name, layout=layout, **overrides)
            grid = latent_grid(height, width, num_frames, tuple(cfg["patch_size"]))
            mixer, cross = wan_mixer_flops(cfg, grid, prompt_len, context_len)
            rows.append(dict(
                model=name, layout=layout, height=height, width=width, num_frames=num_frames,
                latent_grid=list(grid), video_tokens=grid[0] * grid[1] * grid[2],
                mixer_tflops=mixer / 1e12, cross_attention_tflops=cross / 1e12,
                params_b=count_wan_parameters(cfg) / 1e9,
            ))
    return rows


WAN_FLOPS_NOTES = [
    "Self-attention and MM-DiM are the replaced mixers; cross-attention to the 512-token UMT5 context is the "
    "same in both layouts and listed apart. The FFN (4*N*D*ffn) is not a mixer and not counted.",
    "MM-DiM holds the prompt twice (Z_l, Z_r) in the scan; prompt_len (default 128) is the number of real "
    "prompt tokens, the cross-attention context stays Wan's zero-padded 512.",
    "The temporal branch projects every token (every Wan frame is a noisy full-resolution frame, K_s = 1): "
    "6*N*D^2 per layer, more than half of the Mamba layer; temporal_pool=p divides that by p^2.",
    "Paper Table 2 (720 x 1280 x 81): Wan2.1 1700 s, M4V (Wan2.1) 1210 s per video (hardware not stated).",
]


def format_wan_flops(rows: list[dict[str, Any]]) -> str:
    """A text table of ``wan_flops_rows`` output."""
    head = (f"{'model':<9} {'layout':<9} {'size':>14} {'tokens':>7} {'mixer TF':>9} {'cross TF':>9} "
            f"{'params(B)':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        size = f"{r['width']}x{r['height']}x{r['num_frames']}"
        lines.append(f"{r['model']:<9} {r['layout']:<9} {size:>14} {r['video_tokens']:>7} {r['mixer_tflops']:>9.2f} "
                     f"{r['cross_attention_tflops']:>9.2f} {r['params_b']:>9.3f}")
    return "\n".join(lines)


__all__ = [
    "WAN_FLOPS_NOTES",
    "WAN_NAMED_CONFIGS",
    "count_wan_parameters",
    "format_wan_flops",
    "latent_grid",
    "resolved_wan_config",
    "wan_flops_rows",
    "wan_mixer_flops",
    "wan_named_config",
]
