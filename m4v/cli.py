"""The ``m4v`` command: one entry point with subcommands (generate, flops, ...)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence


class UsageError(ValueError):
    """A bad argument or input: reported as one line on stderr, exit code 2, no traceback."""


def _check_flops_sizes(args: argparse.Namespace) -> None:
    """Frames 1 + 8k and pixel sizes the pyramid can halve (VAE 8 x patch x 2^(3-1)), as generation needs them."""
    from m4v.data.video_folder import nearest_valid_num_frames
    from m4v.eval.flops import resolved_config

    m = 8 * int(resolved_config(args.config)["patch_size"]) * 4
    for f in args.frames:
        if f < 1 or (f - 1) % 8:
            raise UsageError(f"--frames: {f} is not 1 + 8k; the nearest valid value is {nearest_valid_num_frames(f)}")
    for name, v in (("--height", args.height), ("--width", args.width)):
        if v < m or v % m:
            raise UsageError(f"{name}: {v} is not allowed; it must be a multiple of {m} (e.g. {max(m, v // m * m)})")
    if args.text_len < 0:
        raise UsageError(f"--text-len: must be >= 0, got {args.text_len}")


def _cmd_flops(args: argparse.Namespace) -> int:
    from m4v.eval.flops import compute_table, format_table, table_dict
    from m4v.models.layouts import LAYOUTS

    if args.family == "wan":
        defaults = {"config": "m4v-768p", "frames": [121, 241], "height": 768, "width": 1280, "text_len": 128,
                    "layouts": None}  # fmt: skip
        for name, default in defaults.items():
            if getattr(args, name) != default:
                raise UsageError(
                    f"--{name.replace('_', '-')}: not used with --family wan, which prints Wan2.1-1.3B/14B at 480p "
                    "and 720p, 81 frames"
                )
        from m4v.models.wan_configs import WAN_FLOPS_NOTES, format_wan_flops, wan_flops_rows

        rows = wan_flops_rows(480, 832, 81) + wan_flops_rows(720, 1280, 81)
        if args.json:
            print(json.dumps({"rows": rows, "notes": WAN_FLOPS_NOTES}, indent=2))
        else:
            print(format_wan_flops(rows))
            print("\nnotes:")
            for n in WAN_FLOPS_NOTES:
                print(f"- {n}")
        return 0
    layouts = tuple(dict.fromkeys(args.layouts)) if args.layouts else LAYOUTS  # each layout once
    for layout in layouts:
        if layout not in LAYOUTS:
            raise UsageError(f"--layouts: unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    _check_flops_sizes(args)
    rows = compute_table(args.config, layouts, tuple(args.frames), args.height, args.width, args.text_len)
    if args.json:
        print(json.dumps(table_dict(rows), indent=2))
    else:
        from m4v.eval.flops import NOTES

        print(format_table(rows))
        print("\nnotes:")
        for n in NOTES:
            print(f"- {n}")
    return 0


FLOPS_HELP = """Mixer-layer TFLOPs and parameter counts for every layout (paper Table 4).

Convention: multiply-add = 2 FLOPs; only the mixer layers (8 MM-DiT joint attentions + 16
single-stream mixers) of one forward pass at the last autoregressive step, final pyramid stage,
batch 1, no CFG. Attention: 8*N*D^2 + 4*N^2*D with N = text + video tokens. Mamba2: in_proj, conv,
SSD recurrence (4*N*d_inner*d_state) and out_proj over the re-composed sequence. Temporal branch:
q/k/v of the current frame and pooled history + the folded causal attention. Parameters are
counted on the real module built on the meta device."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m4v", description="M4V: multi-modal Mamba text-to-video.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "flops", help="mixer TFLOPs and params per layout (Table 4)", description=FLOPS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="m4v-768p")
    p.add_argument("--frames", type=int, nargs="+", default=[121, 241])
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--text-len", type=int, default=128)
    p.add_argument("--layouts", nargs="+")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--family", choices=["pyramidflow", "wan"], default="pyramidflow",
                   help="wan: Wan2.1-1.3B/14B at 480p and 720p, 81 frames, attention vs MM-DiM (Sec. 4.3)")
    p.set_defaults(func=_cmd_flops)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    from m4v import generate_cli
    from m4v.eval import cli as eval_cli
    from m4v.training import cli as training_cli

    return [generate_cli.register, eval_cli.register, training_cli.register]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"m4v {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("m4v: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # out of memory (CPU or GPU); any other RuntimeError is a bug: re-raised
        text = str(e)
        if not (isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text):
            raise
        first = (text.strip().splitlines() or ["MemoryError"])[0][:200]
        print(f"m4v {args.command}: error: out of memory ({first}); try a smaller size, fewer frames or a "
              "smaller batch, or --dtype bfloat16", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
