"""``m4v train``, ``m4v train-vae``, ``m4v prepare`` and ``m4v convert`` (hooked into m4v/cli.py via ``register``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

TRAIN_HELP = """Train the M4V transformer with pyramidal flow matching over the stages of the YAML config.

One GPU or CPU:   m4v train --config configs/train_tiny.yaml
N GPUs, one host: torchrun --nproc_per_node N -m m4v train --config C.yaml
Several hosts:    torchrun --nnodes M --nproc_per_node N --rdzv-backend c10d \\
                      --rdzv-endpoint HOST:29500 --rdzv-id RUN -m m4v train --config C.yaml
Resumes from the latest checkpoint of output_dir unless --resume none. See docs/training.md."""


def quiet_libraries() -> None:
    """diffusers / transformers warnings off (e.g. "pip install accelerate"): the commands print their own lines."""
    from m4v.generate_cli import quiet_libraries as quiet

    quiet()


def _overrides(items: list[str] | None) -> dict[str, Any]:
    from m4v.training.config import parse_override

    return dict(parse_override(s) for s in items or [])


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training YAML (see docs/training.md)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. optim.lr=1e-5")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--resume", help="auto (default: latest checkpoint of output_dir), none, or a checkpoint folder")
    p.add_argument("--stop-at", type=int, metavar="STEP", help="stop (and checkpoint) after this many optimizer steps")
    p.add_argument("--time-limit", type=float, metavar="MIN",
                   help="stop after MIN minutes of training: checkpoint and export final/ as if the schedule ended")


def _common_overrides(args: argparse.Namespace) -> dict[str, Any]:
    ov = _overrides(args.set)
    if args.output_dir:
        ov["output_dir"] = args.output_dir
    if args.resume:
        ov["checkpoint.resume"] = args.resume
    if args.stop_at is not None and args.stop_at < 1:
        raise ValueError(f"--stop-at: must be >= 1, got {args.stop_at}.")
    if args.time_limit is not None and not args.time_limit > 0:
        raise ValueError(f"--time-limit: must be > 0 minutes, got {args.time_limit}.")
    return ov


def _report(trainer: Any, total: int) -> None:
    """The run's last line: where the weights are, or where it stopped and how to go on."""
    if not trainer.info.is_main:
        return
    if trainer.exported is not None:
        print(f"step {trainer.step} of {total}: weights in {trainer.exported}")
    elif trainer.step < total:
        print(f"stopped at step {trainer.step} of {total}; the same command resumes from {trainer.out}/checkpoints")


def cmd_train(args: argparse.Namespace) -> int:
    from m4v.training.config import load_config
    from m4v.training.trainer import run_training

    cfg = load_config(args.config, _common_overrides(args))
    quiet_libraries()
    trainer = run_training(cfg, stop_at=args.stop_at, time_limit=args.time_limit)
    _report(trainer, cfg.total_steps)
    return 128 + trainer.stopped_by if trainer.stopped_by else 0  # stopped by a signal, after saving


def cmd_train_vae(args: argparse.Namespace) -> int:
    from m4v.training.vae_training import load_vae_config, run_vae_training

    cfg = load_vae_config(args.config, _common_overrides(args))
    quiet_libraries()
    trainer = run_vae_training(cfg, stop_at=args.stop_at, time_limit=args.time_limit)
    _report(trainer, cfg.total_steps)
    return 128 + trainer.stopped_by if trainer.stopped_by else 0  # stopped by a signal, after saving


def cmd_prepare(args: argparse.Namespace) -> int:
    from m4v.io.paths import check_output_folder
    from m4v.training.components import load_vae
    from m4v.training.config import DataConfig, TrainConfig, from_dict, load_config
    from m4v.training.distributed import cleanup, init_distributed
    from m4v.training.shards import prepare
    from m4v.training.stop import sigterm_as_interrupt
    from m4v.training.text import load_text_encoder_spec

    if args.set and not args.config:
        raise ValueError("--set: overrides values of --config; give the config it applies to.")
    cfg: TrainConfig | None = load_config(args.config, _overrides(args.set)) if args.config else None
    data = cfg.data if cfg is not None else from_dict(DataConfig, {}, "data")
    data.source = args.data
    given = [args.height, args.width, args.num_frames]
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise ValueError("--height, --width and --num-frames go together (one geometry).")
        geometries = [(args.height, args.width, args.num_frames)]
    elif cfg is not None:
        geometries = list(dict.fromkeys((s.height, s.width, s.num_frames) for s in cfg.stages))
    else:
        raise ValueError("prepare: give --config (its stage geometries) or --height/--width/--num-frames.")
    vae_spec = args.vae or (cfg.vae if cfg is not None else "tiny")
    text_spec = args.text_encoder or (cfg.text_encoder if cfg is not None else "minilm")
    if isinstance(text_spec, str) and text_spec.startswith("{"):
        try:
            text_spec = json.loads(text_spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"--text-encoder: {text_spec!r} is not valid JSON ({e.msg}).") from e
    seed = cfg.seed if cfg is not None else 0
    if args.num_workers is not None and args.num_workers < 0:
        raise ValueError(f"--num-workers: must be >= 0, got {args.num_workers}.")
    for h, w, f in geometries:
        if h < 8 or w < 8 or h % 8 or w % 8:
            raise ValueError(f"--height/--width: must be positive multiples of 8 (the VAE's), got {h}x{w}.")
        if f < 1:
            raise ValueError(f"--num-frames: must be >= 1, got {f}.")
    if args.device is not None:
        from m4v.generate_cli import resolve_device

        resolve_device(args.device)
    check_output_folder(args.out, "--out")
    quiet_libraries()
    info = init_distributed(args.device)
    try:
        vae = load_vae(vae_spec, seed).to(info.device)
        text = load_text_encoder_spec(text_spec).to(info.device)
        with sigterm_as_interrupt():  # a killed prepare removes what it wrote, as on Ctrl-C
            totals = prepare(
                args.data, data, args.out, geometries, vae, text, {"vae": vae_spec, "text_encoder": text_spec},
                batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype, seed=seed,
                num_workers=data.num_workers if args.num_workers is None else args.num_workers,
            )
        if info.is_main:
            for name, t in totals.items():
                skipped = sum(t["skipped"].values())
                detail = f" ({', '.join(f'{k}: {v}' for k, v in sorted(t['skipped'].items()))})" if skipped else ""
                print(f"{name}: {t['items']} items, {skipped} skipped{detail}")
    finally:
        cleanup(info)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from m4v.training.convert import convert_checkpoint

    if bool(args.from_attention) == bool(args.from_wan):
        raise ValueError("convert: give exactly one of --from-attention CKPT_DIR or --from-wan WAN_DIR")
    if not 0 <= args.seed <= 2**63 - 1:  # torch.manual_seed takes a signed 64-bit seed, as m4v generate --seed
        raise ValueError(f"--seed: must be between 0 and {2**63 - 1}, got {args.seed}")
    if args.from_attention:
        wan_only = [f"--{n.replace('_', '-')}" for n in ("vae", "text_encoder", "tokenizer", "dtype")
                    if getattr(args, n, None) is not None]  # fmt: skip
        if wan_only:
            raise ValueError(f"{wan_only[0]}: only used with --from-wan, not with --from-attention.")
    elif getattr(args, "tokenizer", None) is not None and getattr(args, "text_encoder", None) is None:
        raise ValueError("--tokenizer: only used with --text-encoder.")
    if args.from_wan:
        from m4v.training.convert_wan import cli_convert_from_wan

        return cli_convert_from_wan(args)

    quiet_libraries()
    report = convert_checkpoint(
        args.from_attention, args.output, args.layout, args.swap_qk, args.seed, _overrides(args.set),
        fold_qk_norm=not args.no_fold_qk_norm,
    )
    print(
        f"wrote {args.output}: {len(report.copied)} tensors copied, {len(report.from_attention)} initialised "
        f"from attention, {len(report.fresh)} freshly initialised, {len(report.dropped)} dropped"
    )
    return 0


def add_wan_convert_arguments(parser: argparse.ArgumentParser, standalone: bool = False) -> None:
    """Add the Wan-only options to a ``convert`` parser (which already has -o, --layout, --swap-qk, --seed, --set).

    ``standalone`` also adds those shared options (for ``register_convert_wan``).
    """
    if standalone:
        parser.add_argument("--from-wan", required=True, metavar="WAN_DIR",
                            help="Wan2.1 transformer folder (diffusers layout) or a whole Wan diffusers folder")
        parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
        parser.add_argument("--layout", default="mmdim", help="mmdim (default) or attention")
        parser.add_argument("--swap-qk", action="store_true", help="B <- W_q, C <- W_k (the paper's wording)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised parameters")
        parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a target config value")
    else:
        parser.add_argument("--from-wan", metavar="WAN_DIR",
                            help="Wan2.1 transformer folder (diffusers layout) or a whole Wan diffusers folder")
    parser.add_argument("--vae", metavar="DIR", help="Wan VAE folder (AutoencoderKLWan), copied into OUT_DIR/vae")
    parser.add_argument("--text-encoder", metavar="DIR", help="UMT5 encoder folder, or 'minilm' (text_dim 384)")
    parser.add_argument("--tokenizer", metavar="DIR", help="UMT5 tokenizer folder (default: the encoder folder)")
    if standalone:  # the shared convert parser already has it
        parser.add_argument("--no-fold-qk-norm", action="store_true",
                            help="drop Wan's q/k RMSNorm gains instead of folding them into the C/B rows")
    parser.add_argument("--dtype", default=None, help="saved dtype: float32, bfloat16, float16 (default: Wan's)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``train-vae``, ``prepare`` and ``convert`` to the ``m4v`` command."""
    raw = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("train", help="train the transformer (pyramidal flow matching)",
                              description=TRAIN_HELP, formatter_class=raw)
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("train-vae", help="train the causal video VAE (reconstruction + KL)",
                              description="Train the 8x8x8 causal video VAE; same launch and resume rules as train.")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train_vae)

    p = subparsers.add_parser(
        "prepare", help="pre-extract VAE latents and text features into safetensors shards",
        description="Encode a data source once (VAE latents + text features) so training reads no video. "
        "Runs under torchrun too (ranks split the items).",
    )
    p.add_argument("--data", required=True, help="moving_shapes, a folder, a .csv or a .jsonl")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="training YAML: its stage geometries, vae, text_encoder and data options")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a --config value")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num-frames", type=int)
    p.add_argument("--vae", help="named VAE config or VideoVAE folder (default: the config's)")
    p.add_argument("--text-encoder", help="minilm, or a JSON spec such as '{\"t5\": DIR, \"clip\": DIR}'")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=256, help="items per shard file")
    p.add_argument("--dtype", default="bfloat16", help="storage dtype: bfloat16, float16 or float32")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--num-workers", type=int, help="decoding processes (default: the config's data.num_workers)")
    p.set_defaults(func=cmd_prepare)

    p = subparsers.add_parser(
        "convert", help="initialise a Mamba layout from a full_attn checkpoint (paper D.2)",
        description="x <- W_v, B <- W_k, C <- W_q (Mamba-in-the-Llama; --swap-qk: the paper's B <- W_q, "
        "C <- W_k), q/k norm gains folded into C/B, out_proj <- W_o; ada/MLP/dual blocks/embedders copied; "
        "the rest freshly initialised.",
    )
    p.add_argument("--from-attention", metavar="CKPT_DIR", help="save_pretrained full_attn folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    p.add_argument("--layout", default="full_temp", help="target layout (default full_temp)")
    p.add_argument("--swap-qk", action="store_true", help="B <- W_q, C <- W_k (the paper's wording)")
    p.add_argument("--no-fold-qk-norm", action="store_true",
                   help="drop the q/k RMSNorm gains instead of folding them into the C/B rows")
    p.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised parameters")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a target config value")
    add_wan_convert_arguments(p)  # --from-wan DIR and its VAE / text-encoder options (paper Sec. 4.1)
    p.set_defaults(func=cmd_convert)
