"""Reward learning (paper Sec. 3.4, Eqs. 5-6, D.1): one-step denoise, decode, CLIP and aesthetic rewards.

Eq. 5 in our notation (sigma = noise level; stage window ``(s, e)``, ``s > e``; the sample is
``x_t = r * start + (1 - r) * end`` with ``r = (sigma - e) / (s - e)``, the velocity ``v = start - end``
and ``end = e * eps + (1 - e) * x_clean``): one Euler jump to the window end gives
``end = x_t - r * v_hat`` and so ``x_hat = (x_t - r * v_hat - e * eps) / (1 - e)``. With the paper's
time ``t = 1 - sigma`` (clean = 1) and its noisy input ``x_0 = eps`` this is exactly Eq. 5.

The predicted clean latent of the current frame is decoded by the frozen VAE decoder together with
``decode_context`` preceding clean latent frames (so it is decoded as a later frame of the causal
VAE, as at inference), ``num_pixel_frames`` of its pixel frames are scored, and
``L_reward = -(w_clip * r_clip + w_aes * r_aes)`` (Eq. 6) is added to the flow loss with ``weight``
(0.1 in D.1). Gradients flow through the decoder and the reward models into the transformer.
Samples whose text was dropped (classifier-free guidance) get no reward.

Reward models come from LOCAL folders only (nothing is downloaded):
* ``clip_dir``: a transformers ``CLIPModel`` + tokenizer folder; ``r_clip`` = cosine similarity of the
  projected image and text embeddings;
* ``aesthetic_dir``: ``config.json`` ``{"dims": [E, ..., 1], "activation": "none"|"relu"|"gelu",
  "normalize": true}`` + ``head.safetensors`` (``layers.{i}.weight/bias``), an MLP on the (L2-normalised)
  CLIP image embedding (the LAION / HPS-style aesthetic predictor); ``aesthetic_clip_dir`` names its
  CLIP model when it is not ``clip_dir``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m4v.schedulers import downsample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_CONFIG = "config.json"
HEAD_WEIGHTS = "head.safetensors"


def predict_clean(noisy: Tensor, velocity: Tensor, ratio: Tensor, window: tuple[float, float], eps: Tensor) -> Tensor:
    """Eq. 5: clean latent at the stage resolution from one Euler jump to the end of the stage window."""
    s, e = window
    r = ratio.to(noisy.dtype).reshape(-1, *([1] * (noisy.ndim - 1)))
    end = noisy - r * velocity
    return (end - e * eps) / (1.0 - e)


def clip_preprocess(
    images: Tensor, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> Tensor:
    """Differentiable CLIP preprocessing of [N, 3, H, W] images in [-1, 1]: bicubic resize of the shorter
    side to ``size`` (antialiased), centre crop ``size x size``, normalise with the CLIP mean/std."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / sd


class AestheticHead(nn.Module):
    """MLP on CLIP image embeddings -> one score (LAION/HPS-style aesthetic predictor)."""

    def __init__(self, dims: Sequence[int], activation: str = "none", normalize: bool = True) -> None:
        super().__init__()
        if len(dims) < 2 or dims[-1] != 1:
            raise ValueError(f"aesthetic head: dims must go from the embedding size to 1, got {list(dims)}.")
        if activation not in ("none", "relu", "gelu"):
            raise ValueError(f"aesthetic head: activation must be none, relu or gelu, got {activation!r}.")
        self.dims, self.activation, self.normalize = list(dims), activation, normalize
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, emb: Tensor) -> Tensor:
        x = F.normalize(emb.float(), dim=-1) if self.normalize else emb.float()
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1 and self.activation != "none":
                x = F.relu(x) if self.activation == "relu" else F.gelu(x)
        return x.squeeze(-1)


def save_aesthetic_head(folder: str | os.PathLike[str], head: AestheticHead) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / HEAD_CONFIG).write_text(
        json.dumps({"dims": head.dims, "activation": head.activation, "normalize": head.normalize})
    )
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / HEAD_WEIGHTS))


def load_aesthetic_head(folder: str | os.PathLike[str]) -> AestheticHead:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / HEAD_CONFIG).is_file() or not (folder / HEAD_WEIGHTS).is_file():
        raise ValueError(f"reward.aesthetic_dir: {folder} must hold {HEAD_CONFIG} and {HEAD_WEIGHTS}.")
    cfg = json.loads((folder / HEAD_CONFIG).read_text())
    head = AestheticHead(cfg["dims"], cfg.get("activation", "none"), cfg.get("normalize", True))
    head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
    return head


class _Clip(nn.Module):
    """A frozen local CLIPModel with its tokenizer and preprocessing constants."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"reward: CLIP folder {folder!r} has no config.json (give a local CLIPModel folder).")
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"reward: {folder!r} is not a loadable CLIPModel folder ({e}).") from e
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):
            self.tokenizer = None
        self.size = int(self.model.config.vision_config.image_size)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        pre = Path(folder) / "preprocessor_config.json"
        if pre.is_file():
            p = json.loads(pre.read_text())
            self.mean = tuple(p.get("image_mean", self.mean))
            self.std = tuple(p.get("image_std", self.std))
            crop = p.get("crop_size", self.size)
            self.size = int(crop["height"] if isinstance(crop, dict) else crop)

    def train(self, mode: bool = True) -> _Clip:
        return super().train(False)

    def image_embeds(self, images: Tensor) -> Tensor:
        pixels = clip_preprocess(images, self.size, self.mean, self.std).to(self.model.dtype)
        out = self.model.vision_model(pixel_values=pixels)
        return self.model.visual_projection(out.pooler_output)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        if self.tokenizer is None:
            raise ValueError("reward.clip_dir: the CLIP folder has no tokenizer; save one beside the model.")
        max_len = int(self.model.config.text_config.max_position_embeddings)
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        dev = self.model.text_projection.weight.device
        out = self.model.text_model(input_ids=tok["input_ids"].to(dev), attention_mask=tok["attention_mask"].to(dev))
        return self.model.text_projection(out.pooler_output)


class RewardScorer(nn.Module):
    """r_clip (text-image cosine) and r_aes (aesthetic head) of images in [-1, 1]; all weights frozen."""

    def __init__(
        self, clip_dir: str | None, aesthetic_dir: str | None, aesthetic_clip_dir: str | None = None
    ) -> None:
        super().__init__()
        self.clip = _Clip(clip_dir) if clip_dir else None
        self.aesthetic = load_aesthetic_head(aesthetic_dir).eval().requires_grad_(False) if aesthetic_dir else None
        self.aesthetic_clip = None
        if self.aesthetic is not None:
            if aesthetic_clip_dir:
                self.aesthetic_clip = _Clip(aesthetic_clip_dir)
            elif self.clip is None:
                raise ValueError("reward: the aesthetic head needs a CLIP model; set clip_dir or aesthetic_clip_dir.")
            emb = (self.aesthetic_clip or self.clip).model.config.projection_dim
            if self.aesthetic.dims[0] != emb:
                raise ValueError(
                    f"reward.aesthetic_dir: the head expects {self.aesthetic.dims[0]}-d embeddings but the "
                    f"CLIP model gives {emb}-d."
                )

    def train(self, mode: bool = True) -> RewardScorer:
        return super().train(False)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        img = None
        if self.clip is not None:
            img = self.clip.image_embeds(images)
            txt = self.clip.text_embeds(prompts)
            out["clip"] = F.cosine_similarity(img.float(), txt.float(), dim=-1)
        if self.aesthetic is not None:
            emb = self.aesthetic_clip.image_embeds(images) if self.aesthetic_clip is not None else img
            out["aesthetic"] = self.aesthetic(emb)
        return out


def _denormalize(vae: Any, z: Tensor, first_index: int) -> Tensor:
    """Undo the per-frame latent normalisation of latent frames ``first_index ..`` of a clip."""
    norm = vae.latent_norm
    t = z.shape[2]
    shift = torch.full((t,), norm.rest_shift, dtype=z.dtype, device=z.device)
    scale = torch.full((t,), norm.rest_scale, dtype=z.dtype, device=z.device)
    if first_index == 0:
        shift[0], scale[0] = norm.first_shift, norm.first_scale
    return z * scale.view(1, 1, t, 1, 1) - shift.view(1, 1, t, 1, 1)


def decode_last_frames(
    vae: Any, pred: Tensor, clean: Tensor, frame_index: int, context: int, num_pixel_frames: int, checkpoint: bool
) -> Tensor:
    """Decode ``pred [B, C, h, w]`` (latent frame ``frame_index``) after up to ``context`` clean frames of
    ``clean [B, C, T, H, W]`` (downsampled to h x w); returns [B, n, 3, H', W'] pixel frames of the last latent."""
    ctx = min(context, frame_index)
    first = frame_index - ctx
    frames = []
    if ctx:
        levels = 0
        while clean.shape[-1] // 2**levels > pred.shape[-1]:
            levels += 1
        frames = [downsample(clean[:, :, f], levels).to(pred.dtype) for f in range(first, frame_index)]
    z = torch.stack([*frames, pred], 2)
    z = _denormalize(vae, z, first).to(vae.dtype)

    def run(z_: Tensor) -> Tensor:
        return vae.model.decode(z_).sample

    if checkpoint and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint as ckpt

        video = ckpt(run, z, use_reentrant=False)
    else:
        video = run(z)
    per_latent = 1 if z.shape[2] == 1 else 8
    last = video[:, :, video.shape[2] - per_latent :]
    n = min(num_pixel_frames, per_latent)
    idx = torch.linspace(0, per_latent - 1, n).round().long().tolist() if n > 1 else [per_latent - 1]
    return last[:, :, idx].permute(0, 2, 1, 3, 4)


class RewardLearner:
    """Computes the weighted reward loss of Eq. 6 for a flow-matching batch."""

    def __init__(self, cfg: Any, vae: Any, scorer: RewardScorer | None = None) -> None:
        self.cfg = cfg
        self.vae = vae
        self.scorer = scorer or RewardScorer(cfg.clip_dir, cfg.aesthetic_dir, cfg.aesthetic_clip_dir)

    def to(self, device: torch.device) -> RewardLearner:
        self.scorer.to(device)
        return self

    def loss(
        self,
        noisy: Tensor,
        velocity: Tensor,
        ratio: Tensor,
        eps: Tensor,
        window: tuple[float, float],
        clean: Tensor,
        frame_index: int,
        captions: Sequence[str],
        keep: Tensor,
    ) -> tuple[Tensor, dict[str, float]]:
        """(-(w_clip r_clip + w_aes r_aes) averaged over kept samples, stats); zero when none is kept."""
        keep = keep.bool()
        if not bool(keep.any()):
            return velocity.sum() * 0.0, {}
        idx = keep.nonzero().squeeze(1)
        x_hat = predict_clean(noisy[idx], velocity[idx], ratio[idx], window, eps[idx])
        pix = decode_last_frames(
            self.vae, x_hat, clean[idx], frame_index, self.cfg.decode_context, self.cfg.num_pixel_frames,
            self.cfg.decoder_checkpointing,
        )
        b, n = pix.shape[:2]
        prompts = [captions[i] for i in idx.tolist() for _ in range(n)]
        scores = self.scorer(pix.flatten(0, 1), prompts)
        total = torch.zeros((), device=velocity.device)
        stats: dict[str, float] = {}
        for name, w in (("clip", self.cfg.clip_weight), ("aesthetic", self.cfg.aesthetic_weight)):
            if name in scores:
                r = scores[name].float().mean()
                total = total - w * r
                stats[f"r_{name}"] = float(r.detach())
        return total, stats
