"""``m4v eval`` subcommands: VBench-style metrics of generated videos (paper Sec. 4.1, B.1, C.1), the
Moving-Shapes analyser and the built-in prompt suites.  Hook: ``register(subparsers)``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from m4v.io.paths import check_output_file, check_output_folder

VBENCH_HELP = """VBench-style evaluation of a folder of generated videos named PROMPT-INDEX.mp4 (VBench naming).

Without network weights only weight-free measures run: temporal flickering (exact VBench formula) and
proxies of motion smoothness, dynamic degree, subject and background consistency (see
docs/evaluation.md). With local weights: --dino gives VBench's subject consistency, --clip its background
consistency (VBench: ViT-B/32) and a CLIP overall consistency (ViCLIP substitute), --aesthetic its
aesthetic quality on --aesthetic-clip (VBench: ViT-L/14; default: --clip). Imaging quality (MUSIQ) is
not available, so the Quality / Total scores are reported only as partial scores. Unreadable videos are
reported and skipped."""

SHAPES_HELP = """Moving-Shapes evaluation (paper D.1), in one of two modes:

--videos DIR   analyse videos named CAPTION-INDEX.mp4 (canonical captions): finds each object's colour,
               shape, size and motion and scores them against the caption;
--model DIR    generate the held-out prompts (3 held-out colour/shape pairs x 5 motions x 3 backgrounds,
               --seeds seeds each) with the model at its default size and frame count, analyse them the
               same way and report the accuracy of colour, shape and motion and the mean temporal
               flickering. Videos are kept in --videos-out as CAPTION-SEED.mp4 (existing ones are reused,
               so an interrupted run resumes), else in a temporary folder.
               With --frames-out FILE.npz the videos are only generated and their frames saved (for a GPU
               machine without FFmpeg); --frames FILE.npz scores such a file, exactly as --model would."""

GENERATION_FLAGS = ("seeds", "steps", "video_steps", "guidance", "video_guidance", "device", "dtype", "videos_out",
                    "limit", "batch_size", "self_quality_guidance", "sqg_start_frame")


def _check_png(path: str | None) -> None:
    if path is not None and Path(path).suffix.lower() != ".png":
        raise ValueError(f"--plot: {path!r} must end in .png.")


def _cmd_vbench(args: argparse.Namespace) -> int:
    from m4v.eval.report import format_report, plot_report, to_json, write_json
    from m4v.eval.vbench import evaluate_folder
    from m4v.generate_cli import resolve_device

    _check_png(args.plot)
    resolve_device(args.device)  # checked whether or not a network is loaded
    check_output_file(args.out, "--out")  # before the evaluation, not after it
    check_output_file(args.plot, "--plot")
    report = evaluate_folder(
        args.videos,
        prompts=args.prompts,
        clip_dir=args.clip,
        dino_dir=args.dino,
        aesthetic_path=args.aesthetic,
        aesthetic_clip_dir=args.aesthetic_clip,
        device=args.device,
        subsets=args.subsets,
        progress=not args.no_progress,
    )
    if not report["dimensions"]:
        rows, n = report["per_video"], report["num_videos"]
        if args.subsets and not any(r["scores"] or r["errors"] for r in rows):
            raise ValueError(
                f"--subsets: none of the {n} video(s) in {args.videos} has a prompt of a VBench prompt list, so no "
                "dimension applies (name the videos as `m4v sample` does, or leave out --subsets)"
            )
        if all(r["frames"] < 2 for r in rows):
            raise ValueError(
                f"no dimension could be computed for the {n} video(s) in {args.videos}: "
                "every metric needs at least 2 frames per video"
            )
        errors = sorted({e for r in rows for e in r["errors"].values()})
        raise ValueError(
            f"no dimension could be computed for the {n} video(s) in {args.videos}"
            + (f": {errors[0]}" if errors else "")
        )
    if args.out:
        write_json(report, args.out)
    if args.plot:
        plot_report(report, args.plot)
    print(to_json(report) if args.json else format_report(report))
    return 0


def _format_shapes(report: dict) -> str:
    from m4v.eval.shapes import format_flickering

    lines = [f"Moving-Shapes analysis of {report['num_videos']} video(s) in {report['videos_dir']}"]
    if report["accuracy"]:
        acc = ", ".join(f"{k} {100 * v:.1f}%" for k, v in report["accuracy"].items())
        lines.append(f"accuracy over {report['num_scored']} captioned video(s): {acc}")
    lines.append(f"mean temporal flickering: {format_flickering(report['mean_temporal_flickering'])}")
    for s in report["skipped"]:
        lines.append(f"skipped {s['file']}: {s['reason']}")
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """No hub look-ups and no loading chatter from diffusers / transformers while a model loads."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _cmd_shapes(args: argparse.Namespace) -> int:
    from m4v.eval.report import write_json

    modes = [m for m in (args.videos, args.model, args.frames) if m is not None]
    if len(modes) != 1:
        raise ValueError(
            "give exactly one of --videos DIR (analyse videos), --model DIR (generate and analyse) or "
            "--frames FILE.npz (analyse frames saved by --frames-out)."
        )
    if args.frames_out is not None and args.model is None:
        raise ValueError("--frames-out: only used with --model.")
    check_output_file(args.out, "--out")  # before the generation and analysis, not after them
    check_output_file(args.frames_out, "--frames-out")  # its folder is made when the frames are written
    if args.frames_out is not None and not str(args.frames_out).endswith(".npz"):
        raise ValueError(f"--frames-out: must be a .npz file, got {args.frames_out!r}.")
    if args.videos_out is not None:
        check_output_folder(args.videos_out, "--videos-out")
    if args.in_memory and (args.model is None or args.frames_out is not None or args.videos_out is not None):
        raise ValueError("--in-memory: only used with --model, without --frames-out or --videos-out.")
    if args.frames is not None:
        for name in GENERATION_FLAGS:
            if name != "videos_out" and getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')}: only used with --model, not with --frames.")
        from m4v.eval.shapes_generate import evaluate_frames, format_report

        report = evaluate_frames(args.frames, videos_out=args.videos_out, progress=not args.no_progress)
        text = format_report
    elif args.videos is not None:
        for name in GENERATION_FLAGS:
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')}: only used with --model, not with --videos.")
        from m4v.eval.shapes import evaluate_shapes_folder

        report = evaluate_shapes_folder(args.videos, progress=not args.no_progress)
        text = _format_shapes
    else:
        from m4v.eval.shapes_generate import DEFAULT_STEPS, evaluate_model, format_report

        _quiet_libraries()
        report = evaluate_model(
            args.model,
            seeds=2 if args.seeds is None else args.seeds,
            steps=args.steps or DEFAULT_STEPS,
            video_steps=args.video_steps,
            guidance=args.guidance,
            video_guidance=args.video_guidance,
            device=args.device or "cpu",
            dtype=args.dtype or "float32",
            videos_out=args.videos_out,
            limit=args.limit,
            progress=not args.no_progress,
            frames_out=args.frames_out,
            in_memory=args.in_memory,
            batch_size=1 if args.batch_size is None else args.batch_size,
            self_quality_guidance=args.self_quality_guidance or 0.0,
            sqg_start_frame=args.sqg_start_frame,
        )
        text = format_report if args.frames_out is None else _format_frames
    if args.out:
        write_json(report, args.out)
    print(json.dumps(report, indent=2) if args.json else text(report))
    return 0


def _format_frames(report: dict) -> str:
    return f"{report['num_videos']} held-out video(s) of {report['model']} saved to {report['frames']}"


def _cmd_prompts(args: argparse.Namespace) -> int:
    from m4v.eval.sampling import load_prompts

    for p in load_prompts(args.suite):
        print(p)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` (with ``vbench``, ``shapes`` and ``prompts``) to the ``m4v`` command."""
    from m4v.eval.sampling import BUILTIN_PROMPTS

    p = subparsers.add_parser("eval", help="evaluate generated videos (VBench-style, Moving Shapes)")
    sub = p.add_subparsers(dest="eval_command", required=True)

    v = sub.add_parser(
        "vbench", help="VBench-style dimension scores of a folder of videos", description=VBENCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("--videos", required=True, help="folder of PROMPT-INDEX.mp4 videos")
    v.add_argument("--prompts", help=f"prompt file or built-in suite ({', '.join(BUILTIN_PROMPTS)})")
    v.add_argument("--clip", help="local CLIPModel folder (save_pretrained)")
    v.add_argument("--dino", help="local DINO ViT / DINOv2 folder (save_pretrained)")
    v.add_argument("--aesthetic", help="aesthetic head (linear layers) as .safetensors; needs a CLIP")
    v.add_argument(
        "--aesthetic-clip", help="CLIPModel folder under the aesthetic head (VBench: ViT-L/14); default --clip"
    )
    v.add_argument("--device", default="cpu", help="torch device for the networks (default cpu)")
    v.add_argument(
        "--subsets", action="store_true",
        help="VBench standard mode: each dimension only on the prompts of its VBench list",
    )
    v.add_argument("--json", action="store_true", help="print the full report as JSON")
    v.add_argument("--out", help="also write the JSON report to this file")
    v.add_argument("--plot", help="write a PNG bar chart of the dimension scores")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=_cmd_vbench)

    s = sub.add_parser(
        "shapes", help="Moving-Shapes caption accuracy of videos or of a model", description=SHAPES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--videos", metavar="DIR", help="analyse this folder of CAPTION-INDEX.mp4 videos")
    s.add_argument("--model", metavar="DIR", help="generate the held-out prompts with this M4V model and analyse them")
    s.add_argument("--seeds", type=int, metavar="N", help="--model: videos (seeds 0..N-1) per prompt (default 2)")
    s.add_argument("--steps", help="--model: Euler steps per pyramid stage of the first frame, N or a,b,c (default 20)")
    s.add_argument("--video-steps", help="--model: steps per stage of later frames (default half of --steps)")
    s.add_argument("--guidance", type=float, help="--model: text guidance of the first frame (default: the model's)")
    s.add_argument("--video-guidance", type=float, help="--model: guidance of later frames (default: the model's)")
    s.add_argument("--self-quality-guidance", type=float, metavar="W",
                   help="--model: paper E.3 weight for later frames (default 0 = off)")
    s.add_argument("--sqg-start-frame", type=int, metavar="N",
                   help="--model: latent frame from which self-quality guidance applies (default 8)")
    s.add_argument("--device", help="--model: torch device (default cpu)")
    s.add_argument("--dtype", help="--model: float32 (default), bfloat16 or float16 transformer weights")
    s.add_argument("--videos-out", metavar="DIR", help="--model: keep the videos here as CAPTION-SEED.mp4 (resumable)")
    s.add_argument(
        "--limit", type=int, metavar="N", help="--model: only N prompts, a fixed mix (first N of a seeded shuffle)"
    )
    s.add_argument("--batch-size", type=int, metavar="N",
                   help="--model: videos generated together per pipeline call (default 1; same videos for any N)")
    s.add_argument("--frames-out", metavar="FILE.npz", help="--model: only generate; save the frames here")
    s.add_argument("--frames", metavar="FILE.npz", help="score the frames saved by --frames-out")
    s.add_argument("--in-memory", action="store_true",
                   help="--model: score the frames without the H.264 file round trip (no FFmpeg needed)")
    s.add_argument("--json", action="store_true", help="print the full report as JSON")
    s.add_argument("--out", help="also write the JSON report to this file")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_shapes)

    r = sub.add_parser("prompts", help="print a built-in prompt suite, one prompt per line")
    r.add_argument("suite", choices=list(BUILTIN_PROMPTS))
    r.set_defaults(func=_cmd_prompts)


__all__ = ["register"]
