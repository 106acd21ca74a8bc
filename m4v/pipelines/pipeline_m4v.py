"""Text/image-to-video pipeline: autoregressive temporal pyramid, pyramidal flow matching (Sec. 3.1, E.2, E.3).

One latent frame per autoregressive step.  Each frame runs the 3 spatial stages (1/4, 1/2, full
resolution) with Euler steps and a corrected block-noise renoise between stages; its history is the
pyramid of the clean latents generated so far, rebuilt at every stage.  The first latent frame is
generated as an image (or taken from a given image); classifier-free guidance uses the text scale for
the first frame and the video scale afterwards, conditional and unconditional in one batch.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from m4v.defaults import SQG_START_FRAME
from m4v.models.cuda_graphs import CUDAGraphTransformer, cuda_graphs_enabled
from m4v.models.text_encoders import TextEmbeddings, TextEncoder, load_text_encoder
from m4v.models.transformer import M4VTransformer
from m4v.models.vae import VideoVAE
from m4v.pipelines.model_dir import MODEL_INDEX, index_frames, index_size, load_model_dir, resolve_dtype
from m4v.schedulers import PyramidFlowMatchScheduler, temporal_pyramid_history
from m4v.schedulers.pyramid import Generators, _rand


@dataclass
class M4VPipelineOutput(BaseOutput):
    """Generated videos: ``frames`` [B, F, H, W, 3] floats in [0, 1] (np) or [B, 3, F, H, W] in [-1, 1] (pt);
    ``latents`` [B, C, T, h, w] are the normalised clean latents."""

    frames: np.ndarray | torch.Tensor
    latents: torch.Tensor


def pyramid_multiple(transformer: M4VTransformer, scheduler: PyramidFlowMatchScheduler, vae: VideoVAE) -> int:
    """Pixel sizes must be multiples of this: VAE x patch x 2^(stages-1)."""
    return vae.spatial_compression * transformer.config.patch_size * 2 ** (scheduler.config.num_stages - 1)


PYRAMIDFLOW_GUIDANCE = (7.0, 5.0)  # PyramidFlow's text guidance of the first frame and of later frames


def _guidance_pair(value: Any, root: str) -> tuple[float, float]:
    """``default_guidance`` of a model_index.json: two numbers >= 0 (first frame, later frames)."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
    if not ok:
        raise ValueError(f"model directory {root!r}: default_guidance in {MODEL_INDEX} must be two numbers >= 0 "
                         f"(first frame, later frames), got {value!r}")
    return float(value[0]), float(value[1])


def as_int(name: str, value: Any) -> int:
    """``value`` as a Python int: ints and NumPy / torch integer scalars (not bools, not floats such as 64.0)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: must be an integer, got {value!r} ({type(value).__name__})") from None


def as_scale(name: str, value: Any) -> float:
    """A guidance weight: a finite real number >= 0 (ints, floats, NumPy scalars)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: must be a finite number >= 0, got {value}")
    return float(value)


def _steps(name: str, steps: int | Sequence[int], stages: int) -> list[int]:
    try:
        many = isinstance(steps, list | tuple)
        out = [as_int(name, s) for s in steps] if many else [as_int(name, steps)] * stages
    except ValueError:
        out = []
    if len(out) != stages or any(s < 1 for s in out):
        raise ValueError(f"{name}: must be a positive integer or {stages} positive integers (one per stage), "
                         f"got {steps}")
    return out


def write_model_index(
    folder: str | os.PathLike, text_encoder_spec: Any, default_size: tuple[int, int], default_frames: int,
    default_guidance: tuple[float, float] = PYRAMIDFLOW_GUIDANCE,
) -> None:
    """``model_index.json`` of an M4VPipeline folder whose transformer/, vae/ and scheduler/ are written."""
    index = {
        "_class_name": "M4VPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "transformer": ["m4v", "M4VTransformer"],
        "vae": ["m4v", "VideoVAE"],
        "scheduler": ["m4v", "PyramidFlowMatchScheduler"],
        "text_encoder": text_encoder_spec,
        "default_size": list(default_size),
        "default_frames": default_frames,
        "default_guidance": list(default_guidance),
    }
    with open(os.path.join(folder, MODEL_INDEX), "w") as f:
        json.dump(index, f, indent=2)


class M4VPipeline(DiffusionPipeline):
    """Text-to-video and image-to-video generation with an M4V transformer (diffusers DiffusionPipeline)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        transformer: M4VTransformer,
        vae: VideoVAE,
        text_encoder: TextEncoder,
        scheduler: PyramidFlowMatchScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, scheduler=scheduler)
        dims = (text_encoder.token_dim, text_encoder.pooled_dim)
        if dims != (transformer.config.text_dim, transformer.config.pooled_dim):
            raise ValueError(
                f"text_encoder: gives {text_encoder.token_dim}/{text_encoder.pooled_dim}-d token/pooled states but the "
                f"transformer expects {transformer.config.text_dim}/{transformer.config.pooled_dim}"
            )
        self.default_size = (64, 64)
        self.default_frames = 17
        self.default_guidance = PYRAMIDFLOW_GUIDANCE  # (first frame, later frames); a model's own in model_index

    # ------------------------------------------------------------------------------------------- save/load
    def save_pretrained(self, save_directory: str | os.PathLike, text_encoder_spec: Any = "minilm", **_: Any) -> None:
        """Write transformer/, vae/, scheduler/ and model_index.json (the text encoder is referenced, not copied:
        MiniLM ships with the package; T5/CLIP are given as local folders)."""
        os.makedirs(save_directory, exist_ok=True)
        self.transformer.save_pretrained(os.path.join(save_directory, "transformer"))
        self.vae.save_pretrained(os.path.join(save_directory, "vae"))
        self.scheduler.save_pretrained(os.path.join(save_directory, "scheduler"))
        write_model_index(save_directory, text_encoder_spec, self.default_size, self.default_frames,
                          self.default_guidance)  # fmt: skip

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        text_encoder: TextEncoder | None = None,
        torch_dtype: torch.dtype | None = None,
        **_: Any,
    ) -> M4VPipeline:
        """Load a directory written by ``save_pretrained``; nothing is downloaded."""
        root = os.fspath(pretrained_model_name_or_path)
        index, parts = load_model_dir(root, {
            "transformer": lambda d: M4VTransformer.from_pretrained(d, local_files_only=True),
            "vae": VideoVAE.from_pretrained,
            "scheduler": PyramidFlowMatchScheduler.from_pretrained,
        })
        transformer, vae, scheduler = parts["transformer"], parts["vae"], parts["scheduler"]
        if text_encoder is None:
            spec = index.get("text_encoder", "minilm")
            if isinstance(spec, dict):
                spec = {k: (os.path.join(root, v) if k != "max_length" and not os.path.isabs(v) else v)
                        for k, v in spec.items()}
            text_encoder = load_text_encoder(spec)
        pipe = cls(transformer=transformer, vae=vae, text_encoder=text_encoder, scheduler=scheduler)
        pipe.default_size = index_size(index, root, pipe.default_size)
        pipe.default_frames = index_frames(index, root, pipe.default_frames)
        pipe.default_guidance = _guidance_pair(index.get("default_guidance", pipe.default_guidance), root)
        try:  # the defaults must be sizes this model can generate
            pipe.check_inputs("x", *pipe.default_size, pipe.default_frames, 0.0, 0.0)
        except ValueError as e:
            raise ValueError(f"model directory {root!r}: {MODEL_INDEX} defaults are not valid for it ({e})") from None
        if torch_dtype is not None:
            pipe.transformer.to(resolve_dtype(torch_dtype))
        return pipe

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def size_multiple(self) -> int:
        return pyramid_multiple(self.transformer, self.scheduler, self.vae)

    def check_inputs(
        self, prompt: Any, height: int, width: int, num_frames: int, guidance_scale: float, video_guidance_scale: float
    ) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, list | tuple) else []
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError(f"prompt: must be a non-empty string (or a list of them), got {prompt!r}")
        m = self.size_multiple
        for name, v in (("height", height), ("width", width)):
            v = as_int(name, v)
            if v < m or v % m:
                lo = max(m, (v // m) * m)
                raise ValueError(f"{name}: {v} is not allowed; it must be a multiple of {m} (e.g. {lo} or {lo + m})")
        t = self.vae.temporal_compression
        num_frames = as_int("num_frames", num_frames)
        if num_frames < 1 or (num_frames - 1) % t:
            near = max(1, round((num_frames - 1) / t) * t + 1)
            raise ValueError(f"num_frames: {num_frames} is not 1 + {t}k; the nearest valid value is {near}")
        as_scale("guidance_scale", guidance_scale)
        as_scale("video_guidance_scale", video_guidance_scale)
        return prompts

    def encode_prompt(self, prompts: list[str], negative: list[str]) -> tuple[TextEmbeddings, TextEmbeddings]:
        """Conditional and unconditional text, padded to one length so they batch together."""
        both = self.text_encoder(negative + prompts)
        n = len(negative)
        dev = self._execution_device
        cut = [TextEmbeddings(*(t[sl].to(dev) for t in both)) for sl in (slice(n, None), slice(0, n))]
        return cut[0], cut[1]

    def _velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        history: list[torch.Tensor],
        transformer: Callable[..., torch.Tensor],
        scale: float,
    ) -> torch.Tensor:
        """Classifier-free guided velocity; ``transformer(xs, t, history)`` runs the conditional and unconditional
        batch together (the conditional batch alone when ``scale`` is 1)."""
        B = x.shape[0]
        if scale == 1.0:
            return transformer(x, t.expand(B).to(x.device), history).float()
        batch_hist = [torch.cat([h, h]) for h in history]
        v = transformer(torch.cat([x, x]), t.expand(2 * B).to(x.device), batch_hist).float()
        v_u, v_c = v[:B], v[B:]
        return v_u + scale * (v_c - v_u)

    def _transformer_calls(self, cond: TextEmbeddings, uncond: TextEmbeddings, cuda_graphs: bool | None) -> dict:
        """One transformer call per text batch (key: guided or not), through CUDA graphs where enabled."""
        guided = TextEmbeddings(*(torch.cat([u, c]) for u, c in zip(uncond, cond)))
        graphs = cuda_graphs_enabled(cuda_graphs, self.transformer)
        calls = {}
        for key, txt in ((False, cond), (True, guided)):
            if graphs:
                calls[key] = CUDAGraphTransformer(self.transformer, txt.token_states, txt.pooled, txt.attention_mask)
            else:
                calls[key] = partial(self._eager_transformer, txt)
        return calls

    def _eager_transformer(self, txt: TextEmbeddings, x: torch.Tensor, t: torch.Tensor, history: list) -> torch.Tensor:
        return self.transformer(x, t, txt.token_states, txt.pooled, txt.attention_mask, history=history).sample

    # ------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | Sequence[int] = (20, 20, 20),
        video_num_inference_steps: int | Sequence[int] = (10, 10, 10),
        guidance_scale: float | None = None,
        video_guidance_scale: float | None = None,
        generator: Generators = None,
        image: torch.Tensor | np.ndarray | Any | None = None,
        output_type: str = "np",
        callback: Callable[[int, int, int, torch.Tensor], None] | None = None,
        self_quality_guidance: float = 0.0,
        sqg_start_frame: int = SQG_START_FRAME,
        sqg_stages: Sequence[int] | None = None,
        return_dict: bool = True,
        cuda_graphs: bool | None = None,
    ) -> M4VPipelineOutput | tuple:
        """Generate videos.

        ``guidance_scale`` / ``video_guidance_scale``: text guidance of the first / later latent frames; default
        the model's ``default_guidance`` (model_index.json; PyramidFlow's 7 / 5 where it has none).
        ``callback(frame_index, stage, step, latents)`` is called after every Euler step.
        ``self_quality_guidance`` > 0 enables paper E.3 (eqs. 8-10) from latent frame ``sqg_start_frame`` on,
        in ``sqg_stages`` (default: the last stage): ``v = v_l + w (v_h - v_l)`` where ``v_h`` is the guided
        velocity without history (the model's text-to-image mode).
        ``cuda_graphs``: replay one CUDA graph per (frame, stage) shape (``m4v.models.cuda_graphs``); default on
        on a CUDA device, off with ``M4V_CUDA_GRAPHS=0``; True where they cannot run is an error.
        """
        guidance_scale = self.default_guidance[0] if guidance_scale is None else guidance_scale
        video_guidance_scale = self.default_guidance[1] if video_guidance_scale is None else video_guidance_scale
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        num_frames = self.default_frames if num_frames is None else num_frames
        prompts = self.check_inputs(prompt, height, width, num_frames, guidance_scale, video_guidance_scale)
        height, width, num_frames = as_int("height", height), as_int("width", width), as_int("num_frames", num_frames)
        guidance_scale = as_scale("guidance_scale", guidance_scale)
        video_guidance_scale = as_scale("video_guidance_scale", video_guidance_scale)
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type: must be 'np', 'pt' or 'latent', got {output_type!r}")
        S = self.scheduler.config.num_stages
        first_steps = _steps("num_inference_steps", num_inference_steps, S)
        video_steps = _steps("video_num_inference_steps", video_num_inference_steps, S)
        self_quality_guidance = as_scale("self_quality_guidance", self_quality_guidance)
        sqg_stages = tuple(sqg_stages) if sqg_stages is not None else (S - 1,)
        if not sqg_stages or any(isinstance(s, bool) or s not in range(S) for s in sqg_stages):
            raise ValueError(f"sqg_stages: must be pyramid stages in 0..{S - 1}, got {list(sqg_stages)}")
        sqg_start_frame = as_int("sqg_start_frame", sqg_start_frame)
        if self_quality_guidance > 0 and not 1 <= sqg_start_frame < self.vae.num_latent_frames(num_frames):
            raise ValueError(
                f"sqg_start_frame: {sqg_start_frame} is not a latent frame with history (1 to "
                f"{self.vae.num_latent_frames(num_frames) - 1} for {num_frames} frames); self-quality guidance "
                "would never apply"
            )
        if generator is not None and not isinstance(generator, torch.Generator) and not (
            isinstance(generator, list | tuple) and all(isinstance(g, torch.Generator) for g in generator)
        ):
            raise ValueError(f"generator: must be a torch.Generator or a list of them, got {type(generator).__name__}")
        B = len(prompts)
        negative = negative_prompt if negative_prompt is not None else ""
        negatives = [negative] * B if isinstance(negative, str) else None
        negatives = list(negative) if isinstance(negative, list | tuple) else negatives
        if negatives is None or any(not isinstance(n, str) for n in negatives):
            raise ValueError(f"negative_prompt: must be a string or a list of strings, got {negative_prompt!r}")
        if len(negatives) != B:
            raise ValueError(f"negative_prompt: got {len(negatives)} for {B} prompts")
        cond, uncond = self.encode_prompt(prompts, negatives)
        calls = self._transformer_calls(cond, uncond, cuda_graphs)

        device = self._execution_device
        C = self.transformer.config.in_channels
        T = self.vae.num_latent_frames(num_frames)
        h, w = height // self.vae.spatial_compression, width // self.vae.spatial_compression
        clean: list[torch.Tensor] = []
        if image is not None:
            clean.append(self.encode_image(image, height, width, B, generator).to(device))
        total = sum(sum(video_steps if n else first_steps) for n in range(len(clean), T))
        low = 2 ** (S - 1)
        with self.progress_bar(total=total) as bar:
            for n in range(len(clean), T):
                steps, scale = (first_steps, guidance_scale) if n == 0 else (video_steps, video_guidance_scale)
                self.scheduler.set_timesteps(steps, device=device)
                x = _rand((B, C, h // low, w // low), generator, device, torch.float32, normal=True)
                for stage in range(S):
                    history = temporal_pyramid_history(clean, stage, S)
                    use_sqg = self_quality_guidance > 0 and n >= sqg_start_frame and stage in sqg_stages and history
                    for i, t in enumerate(self.scheduler.timesteps_for_stage(stage)):
                        v = self._velocity(x, t, history, calls[scale != 1.0], scale)
                        if use_sqg:
                            v_h = self._velocity(x, t, [], calls[scale != 1.0], scale)
                            v = v + self_quality_guidance * (v_h - v)
                        x = self.scheduler.step(v, stage, i, x).prev_sample
                        if callback is not None:
                            callback(n, stage, i, x)
                        bar.update()
                    if stage < S - 1:
                        x = self.scheduler.renoise_for_next_stage(x, stage + 1, generator)
                clean.append(x)
        latents = torch.stack(clean, 2)
        if output_type == "latent":
            frames: Any = latents
        else:
            video = self.vae.decode(latents.to(self.vae.dtype)).float()
            frames = video if output_type == "pt" else ((video + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)
            frames = frames if output_type == "pt" else frames.cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames, latents)
        return M4VPipelineOutput(frames=frames, latents=latents)

    def encode_image(
        self, image: Any, height: int, width: int, batch: int, generator: Generators
    ) -> torch.Tensor:
        """Image-to-video (paper E.2): the image, resized and centre-cropped, becomes the first latent frame."""
        from m4v.pipelines.image import image_to_tensor

        px = image_to_tensor(image, height, width).to(self.vae.device, self.vae.dtype)  # [3, H, W] in [-1, 1]
        lat = self.vae.encode(px[None, :, None].expand(batch, -1, -1, -1, -1), sample=False)
        return lat[:, :, 0].float()
