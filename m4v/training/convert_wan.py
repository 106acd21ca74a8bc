"""Initialise M4V (Wan2.1) from a Wan2.1 checkpoint in diffusers' layout (paper Sec. 4.1, D.2; Mamba-in-the-Llama).

Everything but the self-attention is copied exactly, under these renames (``WAN_KEY_RULES``):
``condition_embedder.time_embedder.linear_{1,2}`` -> ``time_embedder.fc{1,2}``,
``condition_embedder.time_proj`` -> ``time_proj``, ``condition_embedder.text_embedder.linear_{1,2}`` ->
``text_embedder.fc{1,2}``, ``blocks.i.attn2`` -> ``blocks.i.cross_attn`` (``to_out.0`` -> ``to_out``),
``blocks.i.ffn.net.0.proj`` / ``net.2`` -> ``blocks.i.ffn.fc1`` / ``fc2``; the patch embedding, the
cross-attention norm, the per-block and output modulation tables and the output projection keep
their names.  With ``layout="attention"`` ``blocks.i.attn1`` -> ``blocks.i.mixer`` is copied too (the
result computes exactly what Wan computes).

With ``layout="mmdim"`` every ``blocks.i.attn1`` initialises the block's Mamba2 mixer:

* ``in_proj`` rows ``x <- W_v``, ``B <- W_k``, ``C <- W_q`` (Mamba-in-the-Llama), or ``B <- W_q``,
  ``C <- W_k`` with ``swap_qk`` (the paper's wording); one SSM group per head, d_state = head dim;
* Wan's q/k RMSNorm gains (one per channel, across heads) are folded into the C/B rows
  (``C <- diag(g_q) W_q``): the normalised query is ``g_q * W_q x / rms``, so only the per-token
  ``1/rms`` factor is lost.  ``fold_qk_norm=False`` drops the gains instead;
* ``out_proj <- W_o``; the mixer's output bias ``<- b_o + W_o b_v`` (attention's exact constant term:
  softmax weights sum to one); the q/k biases are dropped (``in_proj`` has none);
* freshly initialised (Mamba2 recipe): the ``z`` and ``dt`` rows, ``dt_bias``, ``A_log``, ``D``, the
  causal conv, the gated norm, the registers and the temporal branch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from m4v.models.wan import M4VWanTransformer, WanMMDiMMixer, build_mixer
from m4v.training.cli import add_wan_convert_arguments  # noqa: F401 - defined there, without torch
from m4v.training.convert import check_mamba_matches_attention, mamba_slices

WAN_CLASS = "WanTransformer3DModel"

WAN_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedder.fc1."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedder.fc2."),
    (r"^condition_embedder\.time_proj\.", "time_proj."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedder.fc1."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedder.fc2."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.mixer.to_out."),
    (r"^blocks\.(\d+)\.attn1\.(to_q|to_k|to_v|norm_q|norm_k)\.", r"blocks.\1.mixer.\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.to_out."),
    (r"^blocks\.(\d+)\.attn2\.(to_q|to_k|to_v|norm_q|norm_k)\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.fc1."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.fc2."),
    (r"^(patch_embedding|proj_out)\.", r"\1."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm2."),
    (r"^(blocks\.\d+\.)?scale_shift_table$", r"\1scale_shift_table"),
)

_ATTN1 = re.compile(r"^blocks\.(\d+)\.attn1\.(.+)$")


def map_wan_key(key: str) -> str:
    """Our parameter name for a WanTransformer3DModel parameter name (ValueError for unsupported ones)."""
    for pattern, repl in WAN_KEY_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    raise ValueError(
        f"--from-wan: parameter {key!r} has no counterpart; only Wan2.1 text-to-video transformers are supported"
    )


@dataclass
class WanConversionReport:
    """What was copied (source -> target), initialised from attention, freshly initialised and dropped."""

    copied: list[tuple[str, str]] = field(default_factory=list)
    from_attention: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    output_dir: str = ""


def config_from_wan(src: dict[str, Any], layout: str = "mmdim", **overrides: Any) -> dict[str, Any]:
    """M4VWanTransformer config for a WanTransformer3DModel ``config.json`` (T2V only)."""
    name = src.get("_class_name", WAN_CLASS)
    if name != WAN_CLASS:
        raise ValueError(f"--from-wan: the checkpoint is a {name}, not a {WAN_CLASS} (Wan2.1 in diffusers' layout)")
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if src.get(key) is not None:
            raise ValueError(f"{key}: is {src[key]!r}; only text-to-video Wan2.1 checkpoints (null) are supported")
    if src.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"qk_norm: is {src['qk_norm']!r}; only 'rms_norm_across_heads' (Wan2.1) is supported")
    heads, head_dim = int(src.get("num_attention_heads", 40)), int(src.get("attention_head_dim", 128))
    cfg = dict(
        family="wan",
        layout=layout,
        patch_size=[int(v) for v in src.get("patch_size", (1, 2, 2))],
        in_channels=int(src.get("in_channels", 16)),
        out_channels=int(src.get("out_channels") or src.get("in_channels", 16)),
        dim=heads * head_dim,
        num_heads=heads,
        ffn_dim=int(src.get("ffn_dim", 13824)),
        num_layers=int(src.get("num_layers", 40)),
        text_dim=int(src.get("text_dim", 4096)),
        freq_dim=int(src.get("freq_dim", 256)),
        eps=float(src.get("eps", 1e-6)),
        cross_attn_norm=bool(src.get("cross_attn_norm", True)),
    )
    cfg.update(overrides)
    return cfg


def _safetensors_files(model_dir: str) -> list[str]:
    indices = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors.index.json"))
    if indices:
        with open(os.path.join(model_dir, indices[0])) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(model_dir, s) for s in sorted(set(weight_map.values()))]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"--from-wan: {model_dir} has no .safetensors weights (nor a .safetensors.index.json)")
    if len(files) > 1:
        raise ValueError(f"--from-wan: {model_dir} has several .safetensors files ({', '.join(files)}) but no index")
    return [os.path.join(model_dir, files[0])]


def load_wan_state_dict(model_dir: str) -> dict[str, Tensor]:
    """All tensors of a diffusers transformer folder: one safetensors file or shards listed by an index."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for path in _safetensors_files(model_dir):
        if not os.path.isfile(path):
            raise ValueError(f"--from-wan: shard {path} listed in the index is missing")
        state.update(load_file(path))
    return state


@torch.no_grad()
def init_mamba_from_wan_attention(
    mixer: WanMMDiMMixer, attn: dict[str, Tensor], num_heads: int, swap_qk: bool = False, fold_qk_norm: bool = True
) -> None:
    """Set x/B/C rows of ``in_proj``, ``out_proj`` and the output bias from one Wan self-attention (``attn1.*``)."""
    f32 = {k: v.float() for k, v in attn.items()}
    wq, wk, wv, wo = f32["to_q.weight"], f32["to_k.weight"], f32["to_v.weight"], f32["to_out.0.weight"]
    if fold_qk_norm:
        wq, wk = wq * f32["norm_q.weight"][:, None], wk * f32["norm_k.weight"][:, None]
    mamba = mixer.mamba
    check_mamba_matches_attention(mamba, wo.shape[0], num_heads)
    s = mamba_slices(mamba)
    w = mamba.in_proj.weight
    w[s["x"]] = wv.to(w.dtype)
    w[s["B"]] = (wq if swap_qk else wk).to(w.dtype)
    w[s["C"]] = (wk if swap_qk else wq).to(w.dtype)
    mamba.out_proj.weight.copy_(wo)
    bias = attn["to_out.0.bias"].double() + attn["to_out.0.weight"].double() @ attn["to_v.bias"].double()
    mixer.out_bias.copy_(bias)


@torch.no_grad()
def convert_wan_state_dict(
    state: dict[str, Tensor],
    config: dict[str, Any],
    *,
    swap_qk: bool = False,
    fold_qk_norm: bool = True,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[M4VWanTransformer, WanConversionReport]:
    """Build an M4VWanTransformer from Wan tensors without materialising default weights for copied tensors."""
    with torch.device("meta"):
        model = M4VWanTransformer(**config)
    mmdim = model.config.layout == "mmdim"
    report = WanConversionReport()
    if mmdim:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i, block in enumerate(model.blocks):
                block.mixer = build_mixer(model.config, i)
    mapped: dict[str, Tensor] = {}
    attn: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        m = _ATTN1.match(key)
        if mmdim and m:
            attn.setdefault(int(m.group(1)), {})[m.group(2)] = value
            continue
        mapped[map_wan_key(key)] = value
        report.copied.append((key, map_wan_key(key)))
    expected = {k for k, v in model.state_dict().items() if v.is_meta}
    missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
    if missing or unexpected:
        detail = f"missing {missing[:4]}" if missing else f"unexpected {unexpected[:4]}"
        raise ValueError(f"--from-wan: the checkpoint does not match its config.json ({detail})")
    target = model.state_dict()
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise ValueError(f"--from-wan: {k} has shape {tuple(v.shape)}, expected {tuple(target[k].shape)}")
    model.load_state_dict(mapped, strict=False, assign=True)
    if mmdim:
        needed = {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias", "to_v.bias",
                  "norm_q.weight", "norm_k.weight"}
        for i, block in enumerate(model.blocks):
            got = attn.get(i, {})
            if needed - set(got):
                raise ValueError(f"--from-wan: blocks.{i}.attn1 lacks {sorted(needed - set(got))}")
            init_mamba_from_wan_attention(block.mixer, got, model.config.num_heads, swap_qk, fold_qk_norm)
            pre = f"blocks.{i}.mixer."
            report.from_attention += [pre + "mamba.in_proj.weight[x,B,C]", pre + "mamba.out_proj.weight",
                                      pre + "out_bias"]
            report.dropped += [f"blocks.{i}.attn1.to_q.bias", f"blocks.{i}.attn1.to_k.bias"]
            if not fold_qk_norm:
                report.dropped += [f"blocks.{i}.attn1.norm_q.weight", f"blocks.{i}.attn1.norm_k.weight"]
            names = [pre + k for k in block.mixer.state_dict()]
            report.fresh += [k for k in names if not k.endswith(("in_proj.weight", "out_proj.weight", "out_bias"))]
            report.fresh.append(pre + "mamba.in_proj.weight[z,dt]")
    left = [k for k, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise ValueError(f"--from-wan: no value for {left[:4]}")
    target_dtype = dtype or state["patch_embedding.weight"].dtype
    return torch.nn.Module.to(model, target_dtype), report


def _transformer_dir(src_dir: str) -> tuple[str, str | None]:
    """(transformer folder, pipeline root or None) for a transformer folder or a whole Wan diffusers folder."""
    if os.path.isfile(os.path.join(src_dir, "transformer", "config.json")):
        return os.path.join(src_dir, "transformer"), src_dir
    if os.path.isfile(os.path.join(src_dir, "config.json")):
        return src_dir, None
    raise ValueError(f"--from-wan: {src_dir} has no config.json (nor transformer/config.json); give a Wan2.1 "
                     "transformer folder in diffusers' layout")


def _text_spec(text_encoder: str, tokenizer_dir: str | None, text_dim: int, text_len: int) -> Any:
    if text_encoder == "minilm":
        if text_dim != 384:
            raise ValueError(f"--text-encoder: MiniLM gives 384-d states but the model has text_dim={text_dim}")
        return "minilm"
    if not os.path.isfile(os.path.join(text_encoder, "config.json")):
        raise ValueError(f"--text-encoder: {text_encoder} has no config.json; give the UMT5 encoder folder or 'minilm'")
    with open(os.path.join(text_encoder, "config.json")) as f:
        d_model = json.load(f).get("d_model")
    if d_model != text_dim:
        raise ValueError(f"--text-encoder: its d_model {d_model} differs from the model's text_dim={text_dim}")
    tok = os.path.abspath(tokenizer_dir) if tokenizer_dir else os.path.abspath(text_encoder)
    return {"umt5": os.path.abspath(text_encoder), "tokenizer": tok, "max_length": text_len}


def convert_from_wan(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    swap_qk: bool = False,
    layout: str = "mmdim",
    fold_qk_norm: bool = True,
    seed: int = 0,
    vae_dir: str | os.PathLike[str] | None = None,
    text_encoder: str | os.PathLike[str] | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    default_size: tuple[int, int] = (480, 832),
    default_frames: int = 81,
    flow_shift: float = 5.0,
) -> WanConversionReport:
    """Convert a Wan2.1 transformer (diffusers layout) and write ``out_dir/transformer`` (save_pretrained).

    ``src_dir`` is the transformer folder or a whole Wan diffusers folder (then its vae/, text_encoder/
    and tokenizer/ are used unless given).  With a VAE and a text encoder (a UMT5 folder or ``"minilm"``)
    ``out_dir`` becomes a complete M4VWanPipeline directory: vae/ (copied), scheduler/
    (FlowMatchEulerDiscreteScheduler with ``flow_shift``) and model_index.json (the text encoder is referenced).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from m4v.pipelines.pipeline_wan import write_model_index

    src, out = os.fspath(src_dir), os.fspath(out_dir)
    if layout not in ("mmdim", "attention"):
        raise ValueError(f"--layout: {layout!r} is not a Wan layout; choose mmdim or attention")
    tdir, root = _transformer_dir(src)
    if root is not None:
        vae_dir = vae_dir or (os.path.join(root, "vae") if os.path.isdir(os.path.join(root, "vae")) else None)
        if text_encoder is None and os.path.isdir(os.path.join(root, "text_encoder")):
            text_encoder = os.path.join(root, "text_encoder")
            tok = os.path.join(root, "tokenizer")
            tokenizer_dir = tokenizer_dir or (tok if os.path.isdir(tok) else None)
    if (vae_dir is None) != (text_encoder is None):
        missing = "--text-encoder" if text_encoder is None else "--vae"
        raise ValueError(f"{missing}: give both --vae and --text-encoder to write a pipeline, or neither")
    if vae_dir is not None and not os.path.isfile(os.path.join(vae_dir, "config.json")):
        raise ValueError(f"--vae: {vae_dir} has no config.json; give an AutoencoderKLWan folder")
    with open(os.path.join(tdir, "config.json")) as f:
        src_cfg = json.load(f)
    cfg = config_from_wan(src_cfg, layout, **(overrides or {}))
    spec = None
    if text_encoder is not None:
        text_len = int(cfg.get("text_len", 512))
        spec = _text_spec(os.fspath(text_encoder), os.fspath(tokenizer_dir) if tokenizer_dir else None,
                          cfg["text_dim"], text_len)
    try:
        model, report = convert_wan_state_dict(
            load_wan_state_dict(tdir), cfg, swap_qk=swap_qk, fold_qk_norm=fold_qk_norm, seed=seed, dtype=dtype
        )
    except (TypeError, ZeroDivisionError, RuntimeError) as e:
        if not overrides:
            raise
        raise ValueError(f"--set: the model these values describe cannot be built ({str(e).splitlines()[0]})") from e
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    if vae_dir is not None:
        dst = os.path.join(out, "vae")
        if os.path.abspath(dst) != os.path.abspath(vae_dir):
            shutil.copytree(vae_dir, dst, dirs_exist_ok=True)
        FlowMatchEulerDiscreteScheduler(shift=flow_shift).save_pretrained(os.path.join(out, "scheduler"))
        write_model_index(out, spec, default_size, default_frames, None)
    report.output_dir = out
    return report


# ----------------------------------------------------------------------------------------------- CLI hooks
def _parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"--dtype: unknown dtype {name!r}; choose float32, bfloat16 or float16")
    return table[name]


def _overrides(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def cli_convert_from_wan(args: argparse.Namespace) -> int:
    """``m4v convert --from-wan DIR -o DIR [--layout mmdim|attention] ...``; prints a one-line summary."""
    from m4v.models.wan import M4VWanTransformer
    from m4v.training.components import check_overrides

    layout = getattr(args, "layout", None)
    if layout in (None, "full_temp"):  # full_temp is the PyramidFlow converter's default
        layout = "mmdim"
    overrides = _overrides(getattr(args, "set", None))
    check_overrides(M4VWanTransformer, overrides, "--set")
    report = convert_from_wan(
        args.from_wan,
        args.output,
        swap_qk=bool(getattr(args, "swap_qk", False)),
        layout=layout,
        fold_qk_norm=not getattr(args, "no_fold_qk_norm", False),
        seed=int(getattr(args, "seed", 0) or 0),
        vae_dir=getattr(args, "vae", None),
        text_encoder=getattr(args, "text_encoder", None),
        tokenizer_dir=getattr(args, "tokenizer", None),
        overrides=overrides,
        dtype=_parse_dtype(getattr(args, "dtype", None)),
    )
    print(
        f"wrote {report.output_dir}: {len(report.copied)} tensors copied, {len(report.from_attention)} initialised "
        f"from attention, {len(report.fresh)} freshly initialised, {len(report.dropped)} dropped"
    )
    return 0


def register_convert_wan(subparsers: argparse._SubParsersAction) -> None:
    """A standalone ``m4v convert-wan`` subcommand (alternative to adding --from-wan to ``m4v convert``)."""
    p = subparsers.add_parser(
        "convert-wan", help="initialise M4V (Wan2.1) from a Wan2.1 checkpoint (paper Sec. 4.1, D.2)",
        description="x <- W_v, B <- W_k, C <- W_q (--swap-qk: B <- W_q, C <- W_k), out_proj <- W_o; Wan's "
        "embedders, cross-attention, FFN, norms, modulation tables and head copied; the rest freshly initialised.",
    )
    add_wan_convert_arguments(p, standalone=True)
    p.set_defaults(func=cli_convert_from_wan)


__all__ = [
    "WAN_KEY_RULES",
    "WanConversionReport",
    "add_wan_convert_arguments",
    "cli_convert_from_wan",
    "config_from_wan",
    "convert_from_wan",
    "convert_wan_state_dict",
    "init_mamba_from_wan_attention",
    "load_wan_state_dict",
    "map_wan_key",
    "register_convert_wan",
]
