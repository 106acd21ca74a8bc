"""``m4v generate``: a sentence in, a video file out (paper Sec. 3.1, E.2, E.3), offline on CPU or GPU."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from importlib import resources
from pathlib import Path

from m4v.defaults import SQG_START_FRAME

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def default_model_dir() -> str:
    """The model shipped inside the package."""
    return str(resources.files("m4v") / "assets" / "default")


def parse_steps(text: str, name: str) -> list[int]:
    """"20" or "20,20,20" -> per-stage step counts (all positive)."""
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"{name}: expected an integer or a comma-separated list of integers, got {text!r}") from None
    if any(s < 1 for s in steps):
        raise ValueError(f"{name}: step counts must be positive, got {text!r}")
    return steps


def check_output_path(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".mp4", ".gif"):
        raise ValueError(f"--output: {path!r} must end in .mp4 or .gif")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--output: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"--output: {path!r} is a directory")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"--output: {path!r} is not writable")
    try:  # a real probe: permission bits say nothing for root or special file systems
        import tempfile

        with tempfile.NamedTemporaryFile(dir=folder, prefix=".m4v-probe-", delete=True):
            pass
    except OSError as e:
        raise ValueError(f"--output: cannot write in {folder!r} ({e.strerror or e})") from None
    return path


def resolve_device(name: str):  # noqa: ANN201 - torch.device
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r} (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {name!r} requested but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("--device: 'mps' requested but MPS is not available")
    elif device.type != "cpu":
        raise ValueError(f"--device: unsupported device {name!r} (use cpu, cuda, cuda:N or mps)")
    return device


def _one_line_warnings() -> None:
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        print(f"m4v: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def quiet_libraries() -> None:
    """Offline, and diffusers / transformers warnings and progress bars off (the commands print their own)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - optional
        pass
    try:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def sqg_kwargs(weight: float, start: int | None, num_latent_frames: int) -> dict:
    """Pipeline arguments of self-quality guidance (paper E.3); a weight that could never apply is an error."""
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"--self-quality-guidance: must be a finite number >= 0, got {weight}")
    if start is not None and start < 1:
        raise ValueError(f"--sqg-start-frame: must be at least 1 (a latent frame with history), got {start}")
    if not weight:
        if start is not None:
            raise ValueError("--sqg-start-frame: only used with --self-quality-guidance W (W > 0)")
        return {}
    start = SQG_START_FRAME if start is None else start
    if start >= num_latent_frames:
        raise ValueError(
            f"--self-quality-guidance: the video has {num_latent_frames} latent frames and guidance starts at latent "
            f"frame {start}, so it would never apply; lower --sqg-start-frame (1 .. {num_latent_frames - 1})"
        )
    return dict(self_quality_guidance=weight, sqg_start_frame=start)


SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def _check_common(args: argparse.Namespace) -> None:
    parse_steps(args.steps, "--steps")
    if args.video_steps:
        parse_steps(args.video_steps, "--video-steps")
    for name, g in (("--guidance", args.guidance), ("--video-guidance", args.video_guidance)):
        if g is not None and (not math.isfinite(g) or g < 0):
            raise ValueError(f"{name}: must be a finite number >= 0, got {g}")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype: unknown dtype {args.dtype!r}; choose float32, bfloat16 or float16")
    if not (math.isfinite(args.fps) and 1 <= args.fps <= 1000):
        raise ValueError(f"--fps: must be a frame rate between 1 and 1000, got {args.fps}")
    top = SEED_MAX - (getattr(args, "per_prompt", 1) - 1)  # m4v sample uses seed .. seed + per_prompt - 1
    if not 0 <= args.seed <= top:
        raise ValueError(f"--seed: must be between 0 and {top}, got {args.seed}")


def _load(args: argparse.Namespace):  # noqa: ANN202 - (pipeline, call kwargs)
    """Load the pipeline on the requested device/dtype and turn the flags into pipeline arguments."""
    _one_line_warnings()
    quiet_libraries()
    import torch

    from m4v.pipelines import M4VPipeline

    device = resolve_device(args.device)
    model_dir = args.model or default_model_dir()
    from m4v.pipelines.pipeline_wan import M4VWanPipeline, is_wan_model_dir

    if is_wan_model_dir(model_dir):
        return _load_wan(args, M4VWanPipeline.from_pretrained(model_dir), device)
    pipe = M4VPipeline.from_pretrained(model_dir)
    pipe.to(device)
    pipe.transformer.to(getattr(torch, DTYPES[args.dtype]))
    stages = pipe.scheduler.config.num_stages
    steps = parse_steps(args.steps, "--steps")
    steps = steps * stages if len(steps) == 1 else steps
    if len(steps) != stages:
        raise ValueError(f"--steps: give 1 or {stages} values (one per pyramid stage), got {len(steps)}")
    kwargs: dict = dict(num_inference_steps=steps, height=args.height, width=args.width, num_frames=args.frames,
                        negative_prompt=args.negative_prompt)
    frames = int(pipe.default_frames) if args.frames is None else args.frames
    latent_frames = pipe.vae.num_latent_frames(frames)
    kwargs.update(sqg_kwargs(args.self_quality_guidance, args.sqg_start_frame, latent_frames))
    if latent_frames == 1 and (args.video_steps or args.video_guidance is not None):
        warnings.warn("--video-steps / --video-guidance: a video of one latent frame uses only --steps / --guidance",
                      stacklevel=2)  # fmt: skip
    if frames > 8 * int(pipe.default_frames):
        warnings.warn(f"--frames {frames}: {frames / int(pipe.default_frames):.0f}x the {pipe.default_frames} frames "
                      "this model makes by default; every later latent frame adds a full pyramid of steps",
                      stacklevel=2)  # fmt: skip
    if args.video_steps:
        video_steps = parse_steps(args.video_steps, "--video-steps")
        video_steps = video_steps * stages if len(video_steps) == 1 else video_steps
        if len(video_steps) != stages:
            raise ValueError(f"--video-steps: give 1 or {stages} values, got {len(video_steps)}")
        kwargs["video_num_inference_steps"] = video_steps
    else:
        kwargs["video_num_inference_steps"] = [max(1, s // 2) for s in steps]
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    if args.video_guidance is not None:
        kwargs["video_guidance_scale"] = args.video_guidance
    return pipe, kwargs


def _load_wan(args: argparse.Namespace, pipe, device):  # noqa: ANN001, ANN202 - (pipeline, call kwargs)
    """The Wan2.1 family: whole-video flow matching, one step count, one guidance scale (paper Sec. 4.1)."""
    import torch

    for flag, value in (("--image", getattr(args, "image", None)), ("--video-steps", args.video_steps),
                        ("--video-guidance", args.video_guidance)):
        if value is not None:
            raise ValueError(f"{flag}: not used by the Wan2.1 family (non-autoregressive); leave it out")
    for flag, used in (("--self-quality-guidance", args.self_quality_guidance),
                       ("--sqg-start-frame", args.sqg_start_frame is not None)):
        if used:
            raise ValueError(f"{flag}: not used by the Wan2.1 family (non-autoregressive)")
    steps = parse_steps(args.steps, "--steps")
    if len(steps) != 1:
        raise ValueError("--steps: the Wan2.1 family takes one step count")
    pipe.to(device)
    pipe.transformer.to(getattr(torch, DTYPES[args.dtype]))
    kwargs: dict = dict(num_inference_steps=steps[0], height=args.height, width=args.width, num_frames=args.frames,
                        negative_prompt=args.negative_prompt)
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    return pipe, kwargs


# pipeline argument -> the command's flag, for errors raised by the pipeline about what a flag set
_FLAG_OF = {"height": "--height", "width": "--width", "num_frames": "--frames", "guidance_scale": "--guidance",
            "video_guidance_scale": "--video-guidance", "num_inference_steps": "--steps",
            "video_num_inference_steps": "--video-steps", "negative_prompt": "--negative-prompt", "image": "--image",
            "self_quality_guidance": "--self-quality-guidance", "sqg_start_frame": "--sqg-start-frame"}  # fmt: skip


def _flag_error(e: ValueError) -> ValueError:
    """The pipeline's ``name: ...`` error with the command's flag for ``name`` (``height:`` -> ``--height:``)."""
    text = str(e)
    name, sep, rest = text.partition(":")
    return ValueError(f"{_FLAG_OF[name]}:{rest}") if sep and name in _FLAG_OF else e


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt or not args.prompt.strip():
        raise ValueError("prompt: must be a non-empty string")
    out = check_output_path(args.output)
    _check_common(args)
    if args.image is not None and not os.path.isfile(args.image):
        raise ValueError(f"--image: file {args.image!r} does not exist")
    import torch

    from m4v.io.video import write_video

    pipe, kwargs = _load(args)
    if args.image is not None:
        kwargs["image"] = args.image
    try:
        result = pipe(args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed), **kwargs)
    except ValueError as e:
        raise _flag_error(e) from None
    write_video(out, result.frames[0], fps=args.fps)
    print(out)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Generate --per-prompt videos for every prompt of a list, VBench naming, resumable."""
    from m4v.eval.sampling import load_prompts, sample_prompts

    _check_common(args)
    if args.per_prompt < 1:
        raise ValueError(f"--per-prompt: must be >= 1, got {args.per_prompt}")
    prompts = load_prompts(args.prompts)
    from m4v.io.paths import check_output_folder

    check_output_folder(args.out, "--out")
    import torch

    pipe, kwargs = _load(args)  # the model is checked before the folder is made
    pipe.set_progress_bar_config(disable=True)
    created = [p for p in (Path(args.out), *Path(args.out).parents) if not p.exists()]
    os.makedirs(args.out, exist_ok=True)

    def generate(prompt: str, seed: int):  # noqa: ANN202 - frames [F, H, W, 3] in [0, 1]
        try:
            return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).frames[0]
        except ValueError as e:
            raise _flag_error(e) from None

    names = ("model", "seed", "frames", "height", "width", "steps", "video_steps", "guidance", "video_guidance",
             "self_quality_guidance", "sqg_start_frame", "negative_prompt", "dtype", "fps")  # fmt: skip
    settings = {n: getattr(args, n) for n in names}
    settings["model"] = os.path.abspath(args.model) if args.model else "shipped"
    try:
        written = sample_prompts(generate, prompts, args.out, per_prompt=args.per_prompt, seed=args.seed, fps=args.fps,
                                 settings=settings)  # fmt: skip
    except BaseException:  # e.g. a size the model cannot make, found at the first video: leave no empty folders
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    print(f"{len(written)} videos in {args.out}")
    return 0


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0): the same seed gives the same video")
    p.add_argument("--frames", type=int, default=None, help="video frames, 1 + 8k (default: the model's)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", default="20", help="Euler steps per pyramid stage for the first frame: N or a,b,c "
                   "(later frames use half unless --video-steps is given)")
    p.add_argument("--video-steps", default=None, help="steps per stage for later frames (PyramidFlow: 10)")
    p.add_argument("--guidance", type=float, default=None,
                   help="text guidance of the first frame (default: the model's; 3 for the shipped one)")
    p.add_argument("--video-guidance", type=float, default=None,
                   help="guidance of later frames (default: the model's; 2 for the shipped one)")
    p.add_argument("--self-quality-guidance", type=float, default=0.0, help="paper E.3 weight (0 = off)")
    p.add_argument("--sqg-start-frame", type=int, default=None,
                   help=f"latent frame from which self-quality guidance applies (default {SQG_START_FRAME})")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--model", default=None, help="model directory (default: the model shipped in the package)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (transformer weights)")
    p.add_argument("--fps", type=float, default=24.0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a video from a sentence (text-to-video / image-to-video)")
    p.add_argument("prompt", help="what the video should show")
    p.add_argument("-o", "--output", required=True, help="output file, .mp4 (H.264) or .gif")
    p.add_argument("--image", default=None, help="image-to-video: this image becomes the first frame")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sample", help="generate videos for a prompt list (VBench naming, resumable)")
    p.add_argument("--prompts", required=True, help="a prompt file (one per line) or a built-in suite name "
                   "(vbench_custom50, user_study50)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--per-prompt", type=int, default=5)
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_sample)
