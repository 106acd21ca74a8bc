"""Initialise MM-DiM blocks from a pre-trained attention model (paper D.2, C.2; Mamba-in-the-Llama).

For every single-stream block that becomes an MM-DiM block:

* ``ada`` (adaLN) and ``mlp`` are copied;
* the Mamba2 ``in_proj`` rows ``[z | x | B | C | dt]`` get ``x <- W_v``, ``B <- W_k``, ``C <- W_q``
  (Mamba-in-the-Llama: in ``y_t = sum_s C_t^T B_s decay x_s`` C plays the query and B the key), or the
  paper's literal ``B <- W_q``, ``C <- W_k`` with ``swap_qk``; one SSM group per attention head and
  ``d_state`` = head dim, ``d_inner`` = width (so every slice has the attention weight's shape);
* the q/k RMSNorm gains (one per head channel, shared by the heads) are folded into the C/B rows
  (``C <- diag(g_q) W_q``: the normalised query is ``g_q * W_q h / rms``, so only the per-token ``1/rms``
  is lost); ``fold_qk_norm=False`` drops them instead;
* ``out_proj <- W_o``;
* freshly initialised: ``z`` and ``dt`` rows, ``dt_bias``, ``A_log``, ``D``, the causal conv, the gated
  norm, the registers and the temporal branch;
* dropped: the qkv bias (Mamba's ``in_proj`` has none) and RoPE (an SSM has no positional rotation).

In the ``parallel`` layout the block's attention branch also gets the attention weights (qkv with bias,
q/k norms) and the SSM is initialised as above (both feed the shared ``out_proj``). Blocks that stay
attention, the dual-stream blocks, the embedders and the output layers are copied exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from m4v.models.layouts import LAYOUTS, block_mixers


@dataclass
class ConversionReport:
    """What was copied, initialised from attention, freshly initialised and dropped."""

    copied: list[str] = field(default_factory=list)
    from_attention: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def mamba_slices(mamba: Any) -> dict[str, slice]:
    """Row ranges of ``in_proj`` for z, x, B, C, dt."""
    d, gn, h = mamba.d_inner, mamba.ngroups * mamba.d_state, mamba.nheads
    return {
        "z": slice(0, d),
        "x": slice(d, 2 * d),
        "B": slice(2 * d, 2 * d + gn),
        "C": slice(2 * d + gn, 2 * d + 2 * gn),
        "dt": slice(2 * d + 2 * gn, 2 * d + 2 * gn + h),
    }


def check_mamba_matches_attention(mamba: Any, width: int, num_heads: int, where: str = "") -> None:
    """Raise ValueError unless ngroups = heads, d_state = head dim and d_inner = width."""
    head_dim = width // num_heads
    problems = []
    if mamba.d_inner != width:
        problems.append(f"d_inner {mamba.d_inner} != width {width} (use ssm_expand=1)")
    if mamba.ngroups != num_heads:
        problems.append(f"ngroups {mamba.ngroups} != num_heads {num_heads} (set ssm_ngroups={num_heads})")
    if mamba.d_state != head_dim:
        problems.append(f"d_state {mamba.d_state} != head dim {head_dim} (set ssm_d_state={head_dim})")
    if problems:
        raise ValueError(
            f"{where}the Mamba block cannot take the attention weights: " + "; ".join(problems) + "."
        )


@torch.no_grad()
def init_mamba_from_attention(
    mamba: Any,
    qkv_weight: Tensor,
    out_weight: Tensor,
    num_heads: int,
    swap_qk: bool = False,
    q_gain: Tensor | None = None,
    k_gain: Tensor | None = None,
) -> None:
    """Copy W_v -> x, W_k -> B, W_q -> C (or W_q -> B, W_k -> C with ``swap_qk``) and W_o -> out_proj.

    ``q_gain`` / ``k_gain`` ([head_dim], the q/k RMSNorm weights shared by all heads) scale the rows
    of W_q / W_k of every head before they are copied.
    """
    width = out_weight.shape[0]
    check_mamba_matches_attention(mamba, width, num_heads)
    wq, wk, wv = qkv_weight.chunk(3, dim=0)
    if q_gain is not None:
        wq = wq * q_gain.repeat(num_heads)[:, None]
    if k_gain is not None:
        wk = wk * k_gain.repeat(num_heads)[:, None]
    s = mamba_slices(mamba)
    w = mamba.in_proj.weight
    w[s["x"]] = wv
    w[s["B"]] = wq if swap_qk else wk
    w[s["C"]] = wk if swap_qk else wq
    mamba.out_proj.weight.copy_(out_weight)


def _clean_config(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@torch.no_grad()
def convert_attention_model(
    source: Any,
    layout: str,
    swap_qk: bool = False,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    fold_qk_norm: bool = True,
) -> tuple[Any, ConversionReport]:
    """A new ``M4VTransformer`` with ``layout``, initialised from the full_attn model ``source``."""
    from m4v.models import M4VTransformer

    if layout not in LAYOUTS:
        raise ValueError(f"--layout: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    src_cfg = _clean_config(source.config)
    n = src_cfg["num_single_layers"]
    if any(m != "attention" for m in block_mixers(src_cfg["layout"], n)):
        raise ValueError(
            f"--from-attention: the checkpoint has layout {src_cfg['layout']!r}; give a full_attn checkpoint."
        )
    from m4v.training.components import check_overrides

    check_overrides(M4VTransformer, overrides or {}, "--set")
    cfg = dict(src_cfg, layout=layout, **(overrides or {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            target = M4VTransformer(**cfg)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--set: the target config {overrides or {}} is not valid ({e}).") from e
    H = int(cfg["num_heads"])
    report = ConversionReport()
    src_sd, dst_sd = source.state_dict(), target.state_dict()
    for k, v in dst_sd.items():
        if not k.startswith("single_blocks."):
            if k not in src_sd or src_sd[k].shape != v.shape:
                raise ValueError(f"--from-attention: parameter {k} does not match between the two configs.")
            v.copy_(src_sd[k])
            report.copied.append(k)
    for i, mixer in enumerate(block_mixers(layout, n)):
        sb, db = source.single_blocks[i], target.single_blocks[i]
        pre = f"single_blocks.{i}."
        if mixer == "attention":
            db.load_state_dict(sb.state_dict())
            report.copied += [pre + k for k in sb.state_dict()]
            continue
        check_mamba_matches_attention(db.mamba, cfg["width"], H, where=f"single block {i}: ")
        for part in ("ada", "mlp"):
            getattr(db, part).load_state_dict(getattr(sb, part).state_dict())
            report.copied += [f"{pre}{part}.{k}" for k in getattr(sb, part).state_dict()]
        gains = (sb.qk_norm.norm_q.weight, sb.qk_norm.norm_k.weight) if fold_qk_norm else (None, None)
        init_mamba_from_attention(db.mamba, sb.qkv.weight, sb.out.weight, H, swap_qk, *gains)
        report.from_attention += [f"{pre}mamba.in_proj.weight[x,B,C]", f"{pre}mamba.out_proj.weight"]
        if mixer == "parallel":
            db.qkv.load_state_dict(sb.qkv.state_dict())
            db.qk_norm.load_state_dict(sb.qk_norm.state_dict())
            report.copied += [pre + "qkv.weight", pre + "qkv.bias"]
            report.copied += [f"{pre}qk_norm.{k}" for k in sb.qk_norm.state_dict()]
        else:
            report.dropped.append(pre + "qkv.bias")
            if not fold_qk_norm:
                report.dropped += [f"{pre}qk_norm.{k}" for k in sb.qk_norm.state_dict()]
        fresh = [f"{pre}{k}" for k in db.state_dict() if not k.startswith(("ada.", "mlp.", "qkv.", "qk_norm."))]
        report.fresh += [k for k in fresh if not k.endswith(("in_proj.weight", "out_proj.weight"))]
        report.fresh.append(f"{pre}mamba.in_proj.weight[z,dt]")
    return target, report


def convert_checkpoint(
    source_dir: str,
    output_dir: str,
    layout: str,
    swap_qk: bool = False,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    fold_qk_norm: bool = True,
) -> ConversionReport:
    """``m4v convert``: load a save_pretrained full_attn folder, convert, save_pretrained to ``output_dir``."""
    import os

    from m4v.io.paths import check_output_folder
    from m4v.models import M4VTransformer
    from m4v.training.components import load_pretrained

    check_output_folder(output_dir, "--output")
    if os.path.abspath(output_dir) == os.path.abspath(source_dir):
        raise ValueError("--output: is the --from-attention folder itself; give another folder.")
    source = load_pretrained(M4VTransformer, source_dir, "--from-attention").float()
    target, report = convert_attention_model(source, layout, swap_qk, seed, overrides, fold_qk_norm)
    target.save_pretrained(output_dir, safe_serialization=True)
    if not os.path.isfile(os.path.join(output_dir, "diffusion_pytorch_model.safetensors")):
        raise ValueError(f"--output: nothing was written to {output_dir}.")
    return report
