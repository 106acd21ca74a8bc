"""M4V (Wan2.1) generation and training step: full-sequence flow matching on the whole video latent (Sec. 4.1).

Wan2.1 is non-autoregressive and has no pyramid: every latent frame is denoised together from pure
noise with Euler steps of diffusers' ``FlowMatchEulerDiscreteScheduler`` on Wan's shifted schedule
``sigma = shift * s / (1 + (shift - 1) * s)``, ``s`` uniform from 1 to 0 (shift 5.0 above 480p and
3.0 at 480p and below, as Wan samples; configurable).  Classifier-free guidance runs the conditional
and unconditional halves in one batch.  Training (``wan_flow_matching_loss``) uses the same
rectified flow: ``x_t = (1 - sigma) x_0 + sigma * noise``, target velocity ``noise - x_0``, sigma
drawn uniformly and passed through the same shift.

Components: an ``M4VWanTransformer``; Wan's ``AutoencoderKLWan`` (4x temporal, 8x spatial, frames =
1 + 4k; latents normalised by its ``latents_mean`` / ``latents_std``); a text encoder: UMT5 from a
local folder (``UMT5TextEncoder``, Wan's encoder) or MiniLM for small models.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from m4v.models.loading import load_strict
from m4v.models.text_encoders import (
    PromptTruncatedWarning,
    TextEmbeddings,
    TextEncoder,
    _check_model_dir,
    _masked_mean,
    _tokenize,
    load_text_encoder,
)
from m4v.models.wan import M4VWanTransformer
from m4v.pipelines.model_dir import MODEL_INDEX, index_frames, index_size, load_model_dir, resolve_dtype
from m4v.pipelines.pipeline_m4v import M4VPipelineOutput
from m4v.schedulers.pyramid import _rand

WAN_TEXT_LEN = 512
PIPELINE_CLASS = "M4VWanPipeline"


def wan_default_shift(height: int, width: int) -> float:
    """Wan's sampling shift: 3.0 for 480p-sized videos (at most 832 x 480 pixels), 5.0 above (720p)."""
    return 3.0 if height * width <= 832 * 480 else 5.0


def shift_sigma(s: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Wan's time shift ``shift * s / (1 + (shift - 1) * s)`` (identity for shift 1)."""
    return shift * s / (1 + (shift - 1) * s)


def wan_latent_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of Wan's latent normalisation, shaped [1, C, 1, 1, 1] like ``like``."""
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
    if mean.shape[1] != like.shape[1] or std.shape[1] != like.shape[1]:
        raise ValueError(f"vae: latents_mean/latents_std have {mean.shape[1]}/{std.shape[1]} entries for "
                         f"{like.shape[1]} latent channels")
    return mean, std


# ----------------------------------------------------------------------------------------------- text
class UMT5TextEncoder(TextEncoder):
    """Wan's text encoder: UMT5 encoder token states from a local folder (4096-d for UMT5-XXL), frozen.

    ``pooled`` is the masked mean of the states (Wan does not use one).  Prompts are padded to the
    longest of the batch; the transformer zero-pads to its ``text_len`` as Wan does.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        tokenizer_dir: str | os.PathLike[str] | None = None,
        max_length: int = WAN_TEXT_LEN,
        torch_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer, UMT5EncoderModel

        model_dir = _check_model_dir(model_dir, "UMT5")
        tok_dir = os.fspath(tokenizer_dir) if tokenizer_dir is not None else model_dir
        if not os.path.isdir(tok_dir):
            raise ValueError(f"tokenizer directory {tok_dir!r} does not exist; give the UMT5 tokenizer's folder.")
        if max_length < 1:
            raise ValueError(f"max_length: must be positive, got {max_length}")
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        self.model = UMT5EncoderModel.from_pretrained(model_dir, local_files_only=True, **kwargs)
        self.max_length = max_length
        self.token_dim = self.pooled_dim = int(self.model.config.d_model)
        self.spec: dict[str, Any] = {"umt5": os.path.abspath(model_dir), "tokenizer": os.path.abspath(tok_dir),
                                     "max_length": max_length}
        self._freeze()

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        tok = _tokenize(self.tokenizer, prompts, self.max_length, "UMT5")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        mask = mask.bool()
        return TextEmbeddings(states, mask, _masked_mean(states, mask))


def load_wan_text_encoder(spec: str | dict[str, Any] = "minilm", root: str | None = None) -> TextEncoder:
    """``"minilm"``, ``{"minilm": DIR}`` or ``{"umt5": DIR, "tokenizer": DIR, "max_length": N}``.

    Relative folders are taken relative to ``root`` (the model directory).
    """
    def path(p: str) -> str:
        return p if root is None or os.path.isabs(p) else os.path.join(root, p)

    if isinstance(spec, dict) and "umt5" in spec:
        unknown = set(spec) - {"umt5", "tokenizer", "max_length"}
        if unknown:
            raise ValueError(f"text_encoder: unknown keys {sorted(unknown)} in the UMT5 spec; "
                             "use {'umt5': DIR, 'tokenizer': DIR, 'max_length': N}")
        tok = spec.get("tokenizer")
        return UMT5TextEncoder(path(spec["umt5"]), path(tok) if tok else None,
                               int(spec.get("max_length", WAN_TEXT_LEN)))
    if isinstance(spec, dict):
        spec = {k: (path(v) if k != "max_length" else v) for k, v in spec.items()}
    return load_text_encoder(spec)


def text_encoder_spec(text_encoder: TextEncoder) -> Any:
    """The model_index spec that reloads ``text_encoder`` (UMT5 folders or MiniLM)."""
    spec = getattr(text_encoder, "spec", None)
    return dict(spec) if spec is not None else "minilm"


def write_model_index(
    root: str | os.PathLike[str],
    text_encoder: Any,
    default_size: tuple[int, int] = (480, 832),
    default_frames: int = 81,
    flow_shift: float | None = None,
) -> str:
    """Write ``model_index.json`` of an M4V (Wan2.1) model directory (transformer/, vae/, scheduler/)."""
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": __import__("diffusers").__version__,
        "family": "wan",
        "transformer": ["m4v", "M4VWanTransformer"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": text_encoder,
        "default_size": [int(default_size[0]), int(default_size[1])],
        "default_frames": int(default_frames),
        "flow_shift": flow_shift,
    }
    path = os.path.join(os.fspath(root), MODEL_INDEX)
    with open(path, "w") as f:
        json.dump(index, f, indent=2)
    return path


def is_wan_model_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds an M4V (Wan2.1) model (its model_index names M4VWanPipeline / family wan)."""
    index_path = os.path.join(os.fspath(path), MODEL_INDEX)
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(index, dict):
        return False  # the M4V loader names the problem
    return index.get("_class_name") == PIPELINE_CLASS or index.get("family") == "wan"


# ----------------------------------------------------------------------------------------------- pipeline
class M4VWanPipeline(DiffusionPipeline):
    """Text-to-video with an M4V (Wan2.1) transformer: whole-video flow matching, CFG in one batch."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        transformer: M4VWanTransformer,
        vae: AutoencoderKLWan,
        text_encoder: TextEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, scheduler=scheduler)
        if text_encoder.token_dim != transformer.config.text_dim:
            raise ValueError(f"text_encoder: gives {text_encoder.token_dim}-d token states but the transformer expects "
                             f"text_dim={transformer.config.text_dim}")
        if vae.config.z_dim != transformer.config.in_channels:
            raise ValueError(f"vae: has {vae.config.z_dim} latent channels but the transformer expects "
                             f"in_channels={transformer.config.in_channels}")
        self.default_size: tuple[int, int] = (480, 832)
        self.default_frames = 81
        self.flow_shift: float | None = None

    # ------------------------------------------------------------------------------------------- save/load
    def save_pretrained(  # type: ignore[override]
        self, save_directory: str | os.PathLike, text_encoder_spec_override: Any = None, **_: Any
    ) -> None:
        """Write transformer/, vae/, scheduler/ and model_index.json (the text encoder is referenced, not copied)."""
        os.makedirs(save_directory, exist_ok=True)
        self.transformer.save_pretrained(os.path.join(save_directory, "transformer"))
        self.vae.save_pretrained(os.path.join(save_directory, "vae"))
        self.scheduler.save_pretrained(os.path.join(save_directory, "scheduler"))
        spec = text_encoder_spec_override if text_encoder_spec_override is not None else text_encoder_spec(
            self.text_encoder)
        write_model_index(save_directory, spec, self.default_size, self.default_frames, self.flow_shift)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        text_encoder: TextEncoder | None = None,
        torch_dtype: torch.dtype | None = None,
        **_: Any,
    ) -> M4VWanPipeline:
        """Load a directory written by ``save_pretrained`` or ``convert_from_wan``; nothing is downloaded."""
        root = os.fspath(pretrained_model_name_or_path)
        index, parts = load_model_dir(root, {
            "transformer": lambda d: M4VWanTransformer.from_pretrained(d, local_files_only=True),
            "vae": lambda d: load_strict(AutoencoderKLWan.from_pretrained, "AutoencoderKLWan", d, "vae"),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained,
        }, kind="M4V (Wan2.1)")
        transformer, vae, scheduler = parts["transformer"], parts["vae"], parts["scheduler"]
        if index.get("_class_name") not in (PIPELINE_CLASS, None):
            raise ValueError(f"model directory {root!r} holds a {index['_class_name']}, not an M4V (Wan2.1) model")
        if text_encoder is None:
            text_encoder = load_wan_text_encoder(index.get("text_encoder", "minilm"), root)
        pipe = cls(transformer=transformer, vae=vae, text_encoder=text_encoder, scheduler=scheduler)
        pipe.default_size = index_size(index, root, pipe.default_size)
        pipe.default_frames = index_frames(index, root, pipe.default_frames)
        pipe.flow_shift = index.get("flow_shift")
        if torch_dtype is not None:
            pipe.transformer.to(resolve_dtype(torch_dtype))
        return pipe

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def temporal_compression(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_temporal", 4) or 4)

    @property
    def spatial_compression(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_spatial", 8) or 8)

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this: VAE x spatial patch."""
        return self.spatial_compression * int(self.transformer.config.patch_size[1])

    def check_inputs(
        self, prompt: Any, height: int, width: int, num_frames: int, num_inference_steps: int,
        guidance_scale: float, shift: float | None,
    ) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("prompt: must be a non-empty string (or a list of them)")
        m = self.size_multiple
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v < m or v % m:
                lo = max(m, (v // m) * m) if isinstance(v, int) else m
                raise ValueError(f"{name}: {v} is not allowed; it must be a multiple of {m} (e.g. {lo} or {lo + m})")
        t = self.temporal_compression * int(self.transformer.config.patch_size[0])
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % t:
            near = max(1, round((num_frames - 1) / t) * t + 1) if isinstance(num_frames, int) else 1
            raise ValueError(f"num_frames: {num_frames} is not 1 + {t}k; the nearest valid value is {near}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: must be a positive integer, got {num_inference_steps!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale: must be >= 0, got {guidance_scale}")
        if shift is not None and not shift > 0:
            raise ValueError(f"shift: must be positive, got {shift}")
        return prompts

    def encode_prompt(self, prompts: list[str], negative: list[str]) -> tuple[TextEmbeddings, TextEmbeddings]:
        """Conditional and unconditional text, padded to one length so they batch together."""
        both = self.text_encoder(negative + prompts)
        limit = int(self.transformer.config.text_len)
        if both.token_states.shape[1] > limit:
            warnings.warn(f"text: prompts were cut to the transformer's text_len={limit} tokens",
                          PromptTruncatedWarning, stacklevel=2)
            both = TextEmbeddings(both.token_states[:, :limit], both.attention_mask[:, :limit], both.pooled)
        n = len(negative)
        dev = self._execution_device
        cut = [TextEmbeddings(*(t[sl].to(dev) for t in both)) for sl in (slice(n, None), slice(0, n))]
        return cut[0], cut[1]

    @staticmethod
    def sigmas(num_inference_steps: int) -> list[float]:
        """Wan's unshifted sigma grid ``linspace(1, 0, n + 1)[:n]`` (the scheduler applies ``shift``)."""
        return np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].tolist()

    def _velocity(
        self, x: torch.Tensor, t: torch.Tensor, cond: TextEmbeddings, uncond: TextEmbeddings, scale: float
    ) -> torch.Tensor:
        """Classifier-free guided velocity, conditional and unconditional in one batch."""
        B = x.shape[0]
        if scale == 1.0:
            txt, xs = cond, x
        else:
            txt = TextEmbeddings(*(torch.cat([u, c]) for u, c in zip(uncond, cond)))
            xs = torch.cat([x, x])
        tt = t.expand(xs.shape[0]).to(xs.device)
        v = self.transformer(xs, tt, txt.token_states, txt.attention_mask).sample.float()
        if scale == 1.0:
            return v
        v_u, v_c = v[:B], v[B:]
        return v_u + scale * (v_c - v_u)

    def encode_video(self, video: torch.Tensor, sample: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, C, 1 + (F-1)/4, H/8, W/8]."""
        dist = self.vae.encode(video.to(self.vae.device, self.vae.dtype)).latent_dist
        z = (dist.sample(generator) if sample else dist.mode()).float()
        mean, std = wan_latent_stats(self.vae, z)
        return (z - mean) / std

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels [B, 3, F, H, W] in [-1, 1]."""
        mean, std = wan_latent_stats(self.vae, latents.float())
        z = latents.float() * std + mean
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()

    # ------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | Sequence[int] = 50,
        guidance_scale: float = 5.0,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        callback: Callable[[int, int, int, torch.Tensor], None] | None = None,
        shift: float | None = None,
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> M4VPipelineOutput | tuple:
        """Generate videos; the whole latent video is denoised at once.

        ``callback(0, 0, step, latents)`` is called after every Euler step (M4VPipeline's signature with one
        frame group and one stage).  ``shift`` defaults to the model's ``flow_shift`` or Wan's value for the
        resolution (``wan_default_shift``).  ``latents`` [B, C, T, h, w] replaces the initial noise.
        """
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        num_frames = self.default_frames if num_frames is None else num_frames
        if isinstance(num_inference_steps, list | tuple) and len(num_inference_steps) == 1:
            num_inference_steps = num_inference_steps[0]  # one "stage": the m4v CLI's --steps N
        prompts = self.check_inputs(prompt, height, width, num_frames, num_inference_steps, guidance_scale, shift)
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type: must be 'np', 'pt' or 'latent', got {output_type!r}")
        B = len(prompts)
        negative = negative_prompt if negative_prompt is not None else ""
        negatives = [negative] * B if isinstance(negative, str) else list(negative)
        if len(negatives) != B:
            raise ValueError(f"negative_prompt: got {len(negatives)} for {B} prompts")
        cond, uncond = self.encode_prompt(prompts, negatives)

        device = self._execution_device
        C = self.transformer.config.in_channels
        T = (num_frames - 1) // self.temporal_compression + 1
        shape = (B, C, T, height // self.spatial_compression, width // self.spatial_compression)
        if latents is None:
            x = _rand(shape, generator, device, torch.float32, normal=True)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        else:
            x = latents.to(device, torch.float32)
        shift = shift if shift is not None else self.flow_shift if self.flow_shift is not None else \
            wan_default_shift(height, width)
        self.scheduler.set_shift(float(shift))
        self.scheduler.set_timesteps(sigmas=self.sigmas(num_inference_steps), device=device)
        with self.progress_bar(total=num_inference_steps) as bar:
            for i, t in enumerate(self.scheduler.timesteps):
                v = self._velocity(x, t, cond, uncond, guidance_scale)
                x = self.scheduler.step(v, t, x, return_dict=False)[0]
                if callback is not None:
                    callback(0, 0, i, x)
                bar.update()
        if output_type == "latent":
            frames: Any = x
        else:
            video = self.decode_latents(x)
            frames = video if output_type == "pt" else ((video + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)
            frames = frames if output_type == "pt" else frames.cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames, x)
        return M4VPipelineOutput(frames=frames, latents=x)


# ----------------------------------------------------------------------------------------------- training
def _text_parts(text: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if hasattr(text, "token_states"):
        return text.token_states, text.attention_mask
    if isinstance(text, tuple | list) and len(text) in (2, 3):
        return text[0], text[1]
    if isinstance(text, torch.Tensor):
        return text, None
    raise ValueError("text: must be TextEmbeddings, (token_states, attention_mask) or a token-state tensor")


def wan_flow_matching_loss(
    model: M4VWanTransformer,
    latents: torch.Tensor,
    text: Any,
    generator: torch.Generator | None = None,
    *,
    shift: float = 5.0,
    text_drop_prob: float = 0.0,
) -> torch.Tensor:
    """Full-sequence rectified-flow loss on whole video latents [B, C, T, h, w] (normalised, clean).

    sigma = shift(u), u ~ U(0, 1); x_t = (1 - sigma) x_0 + sigma * noise; the model gets timestep
    1000 * sigma and is regressed (MSE) on the velocity ``noise - x_0``.  ``text`` is TextEmbeddings or
    (token_states [B, L, text_dim], attention_mask [B, L]).  ``text_drop_prob`` replaces a sample's text
    by the empty (all-padding) text for classifier-free guidance.  Random draws come from ``generator``.
    """
    if latents.ndim != 5:
        raise ValueError(f"latents: expected [B, C, T, h, w], got {tuple(latents.shape)}")
    if not shift > 0:
        raise ValueError(f"shift: must be positive, got {shift}")
    if not 0.0 <= text_drop_prob <= 1.0:
        raise ValueError(f"text_drop_prob: must be in [0, 1], got {text_drop_prob}")
    states, mask = _text_parts(text)
    B, dev = latents.shape[0], latents.device
    x0 = latents.float()
    u = _rand((B,), generator, dev, torch.float32, normal=False)
    noise = _rand(tuple(latents.shape), generator, dev, torch.float32, normal=True)
    sigma = shift_sigma(u, shift)
    s = sigma.view(B, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    if mask is None:
        mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
    if text_drop_prob > 0:
        keep = _rand((B,), generator, dev, torch.float32, normal=False) >= text_drop_prob
        mask = mask.bool() & keep[:, None].to(mask.device)
    dtype = next(model.parameters()).dtype
    pred = model(x_t.to(dtype), sigma * 1000.0, states, mask).sample
    return F.mse_loss(pred.float(), noise - x0)


__all__ = [
    "M4VWanPipeline",
    "UMT5TextEncoder",
    "is_wan_model_dir",
    "load_wan_text_encoder",
    "shift_sigma",
    "text_encoder_spec",
    "wan_default_shift",
    "wan_flow_matching_loss",
    "wan_latent_stats",
    "write_model_index",
]
