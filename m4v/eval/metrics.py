"""VBench quality dimensions (paper Sec. 4.1, B.1, C.1): exact temporal flickering, weight-free proxies and
network versions of subject / background / overall consistency and aesthetic quality.

Every function takes one video as an array or tensor ``[F, H, W, 3]``: ``uint8`` or float in ``[0, 1]``.

What VBench does (Vchitect/VBench, ``vbench/*.py``) and what is implemented here:

* temporal flickering (``vbench/temporal_flickering.py``, ``cal_score``): mean absolute difference of
  consecutive frames on the 0..255 scale, averaged over pairs; score ``(255 - mae) / 255``.  Implemented
  exactly (:func:`temporal_flickering`); float input is scaled by 255 without rounding.  (VBench applies it
  only to videos of its "static" prompts, after a static filter; we apply it to every video.)
* motion smoothness (``vbench/motion_smoothness.py``): the even frames 0, 2, 4, ... are fed to the AMT
  frame-interpolation network, which predicts each odd frame from its two even neighbours; score
  ``(255 - mean |odd - predicted odd|) / 255``.  Proxy (:func:`motion_smoothness_proxy`): the same frames
  and the same mapping, with AMT replaced by bilateral block matching (for each 8x8 block of the middle
  frame, the symmetric displacement ``d`` minimising ``|prev(p - d) - next(p + d)|`` over the block;
  prediction ``(prev(p - d) + next(p + d)) / 2``, half-pixel ``d`` by averaging neighbours).
* dynamic degree (``vbench/dynamic_degree.py``): frames subsampled to about 8 fps (every
  ``round(fps / 8)``-th frame); RAFT flow between consecutive kept frames; per pair the mean of the largest
  5 % flow magnitudes; a video is dynamic when at least ``round(4 * n / 16)`` pairs exceed
  ``max(1, 8 / fps) * 6 * min(H, W) / 256`` pixels (``n`` kept frames); the dimension is the fraction of
  dynamic videos.  Proxy (:func:`dynamic_degree_proxy`): the same rule with RAFT replaced by integer block
  matching (8x8 blocks, smallest displacement wins ties) at a working resolution, the threshold scaled to
  that resolution, the top 5 % taken over blocks farther from the border than the search radius.
  Deviation: at least one pair must exceed the threshold (VBench's count can round to 0).
* subject consistency (``vbench/subject_consistency.py``, DINO ViT-B/16) and background consistency
  (``vbench/background_consistency.py``, CLIP ViT-B/32): L2-normalised per-frame features ``f_i``; frame
  ``i >= 1`` scores ``(max(0, cos(f_{i-1}, f_i)) + max(0, cos(f_0, f_i))) / 2``; a video scores the mean over
  its frames and the dimension is the mean over all frames of all videos (frame-weighted).  The same
  formula (:func:`consistency_scores`) runs on network features (:class:`DinoEncoder`,
  :class:`ClipEncoder`).  Weight-free proxies keep the formula and replace the cosine: subject
  (:func:`subject_consistency_proxy_scores`): :func:`aligned_similarity`, the normalised cross-correlation
  of the mean-removed 32x32 frames maximised over translations (a subject that moves keeps its score, new
  content scores near 0); background (:func:`background_consistency_proxy_scores`): cosine of 8x8x8 joint
  RGB histograms.
* overall consistency (``vbench/overall_consistency.py``): ViCLIP video-text cosine on 8 frames sampled at
  the middle of 8 equal intervals.  ViCLIP weights are not available here: :func:`overall_consistency` uses
  CLIP instead (mean of the normalised image embeddings of the same 8 frames, re-normalised, cosine with
  the text embedding); the scale is close to ViCLIP's but the values are not interchangeable.
* aesthetic quality (``vbench/aesthetic_quality.py``): LAION aesthetic head (linear, 768 -> 1) on the
  normalised CLIP ViT-L/14 embedding of every frame, divided by 10, averaged.  :class:`AestheticHead` loads
  any chain of linear layers (the LAION linear head or the "improved" MLP, which has no activations) from
  a safetensors file.
* imaging quality (MUSIQ) has no implementation here.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VideoLike = Any  # np.ndarray | torch.Tensor of shape [F, H, W, 3]


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------

_CHUNK = 16  # frames converted to float at a time (a 121-frame 768p video stays uint8 in memory)


def as_video_array(video: VideoLike, min_frames: int = 1) -> np.ndarray:
    """Validate a video ``[F, H, W, 3]``: returns it as a uint8 array or a float32 array in [0, 1]."""
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu()
        if video.dtype in (torch.bfloat16, torch.float16):
            video = video.float()
        video = video.numpy()
    arr = np.asarray(video)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"video must have shape [F, H, W, 3]; got {tuple(arr.shape)}.")
    if arr.shape[0] < min_frames:
        raise ValueError(f"video must have at least {min_frames} frames; got {arr.shape[0]}.")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("video contains NaN or infinite values.")
        if arr.size and (arr.min() < -1e-3 or arr.max() > 1.0 + 1e-3):
            raise ValueError("float video values must lie in [0, 1].")
        return np.clip(arr, 0.0, 1.0).astype(np.float32, copy=False)
    raise ValueError(f"video must be uint8 or float in [0, 1]; got dtype {arr.dtype}.")


def _chunk_255(arr: np.ndarray, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Frames ``start:stop`` of a validated video as a tensor [n, 3, H, W] on the 0..255 scale."""
    x = torch.from_numpy(np.ascontiguousarray(arr[start:stop])).permute(0, 3, 1, 2).to(dtype)
    return x if arr.dtype == np.uint8 else x * 255.0


def _work_resolution(x: torch.Tensor, max_side: int | None) -> torch.Tensor:
    """Area-downsample [N, C, H, W] so that min(H, W) <= max_side (no change if already small enough)."""
    h, w = x.shape[-2:]
    if max_side is None or min(h, w) <= max_side:
        return x
    f = min(h, w) / max_side
    size = (max(1, round(h / f)), max(1, round(w / f)))
    return F.interpolate(x, size=size, mode="area")


def work_frames(video: VideoLike, max_side: int | None = None, min_frames: int = 1) -> torch.Tensor:
    """Video as float32 [F, 3, h, w] on the 0..255 scale, area-downsampled so that ``min(h, w) <= max_side``."""
    arr = as_video_array(video, min_frames=min_frames)
    chunks = [_work_resolution(_chunk_255(arr, i, i + _CHUNK), max_side) for i in range(0, len(arr), _CHUNK)]
    return torch.cat(chunks)


# ----------------------------------------------------------------------------------------------
# temporal flickering (exact)
# ----------------------------------------------------------------------------------------------


def temporal_flickering(video: VideoLike) -> float:
    """VBench temporal flickering: ``(255 - mean_t mean|x_{t+1} - x_t|) / 255`` (a static video gives 1.0)."""
    arr = as_video_array(video, min_frames=2)
    per_pair = arr[0].size
    total = 0.0
    for i in range(0, len(arr) - 1, _CHUNK):
        x = arr[i : i + _CHUNK + 1]
        if arr.dtype == np.uint8:
            total += float(np.abs(np.diff(x.astype(np.int16), axis=0)).sum(dtype=np.int64))
        else:
            total += float(np.abs(np.diff(x.astype(np.float64), axis=0)).sum()) * 255.0
    mae = total / (per_pair * (len(arr) - 1))
    return float((255.0 - mae) / 255.0)


# ----------------------------------------------------------------------------------------------
# block matching helpers
# ----------------------------------------------------------------------------------------------


def _shift(padded: torch.Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    """out[..., y, x] = img[..., y + dy, x + dx] with edge replication (``padded`` is img padded by ``pad``)."""
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


class _HalfPel:
    """An image padded by edge replication, sampled at half-pixel offsets (bilinear, i.e. neighbour means)."""

    def __init__(self, img: torch.Tensor, pad: int) -> None:
        p = F.pad(img, (pad, pad + 1, pad, pad + 1), mode="replicate")
        hx = 0.5 * (p[..., :, :-1] + p[..., :, 1:])
        hy = 0.5 * (p[..., :-1, :] + p[..., 1:, :])
        # variants[(odd_y, odd_x)] sampled at +0.5 along the odd axes
        self.variants = {(0, 0): p, (0, 1): hx, (1, 0): hy, (1, 1): 0.5 * (hx[..., :-1, :] + hx[..., 1:, :])}
        self.pad = pad
        self.h, self.w = img.shape[-2:]

    def at(self, hy2: int, hx2: int) -> torch.Tensor:
        """Image sampled at (y + hy2 / 2, x + hx2 / 2)."""
        v = self.variants[(hy2 % 2, hx2 % 2)]
        dy, dx = hy2 // 2, hx2 // 2
        return v[..., self.pad + dy : self.pad + dy + self.h, self.pad + dx : self.pad + dx + self.w]


def _block_cost(a: torch.Tensor, b: torch.Tensor, buf: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of |a - b| per block: [N, 1, H, W] -> [N, Hb, Wb] (``buf`` is scratch space of a's shape)."""
    torch.sub(a, b, out=buf)
    return F.avg_pool2d(buf.abs_(), block, ceil_mode=True)[:, 0]


def _blocks_to_pixels(x: torch.Tensor, block: int, h: int, w: int) -> torch.Tensor:
    """[N, Hb, Wb] -> [N, H, W] by repeating each block value."""
    return x.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)[:, :h, :w]


def interpolate_middle(prev: torch.Tensor, nxt: torch.Tensor, block: int = 8, radius: int = 4) -> torch.Tensor:
    """Predict the frame half-way between ``prev`` and ``nxt`` ([N, 3, H, W]) by bilateral block matching.

    For every ``block`` x ``block`` block the symmetric displacement ``d`` (half-pixel steps, ``|d| <= radius``
    per axis) minimising ``mean|prev(p - d) - next(p + d)|`` (on the channel sum) is chosen, a tiny penalty on
    ``|d|`` breaking ties towards no motion; the prediction is ``(prev(p - d) + next(p + d)) / 2``.
    """
    n, _, h, w = prev.shape
    pad = radius + 1
    gp, gn = _HalfPel(prev.sum(1, keepdim=True), pad), _HalfPel(nxt.sum(1, keepdim=True), pad)
    cands = [(dy2, dx2) for dy2 in range(-2 * radius, 2 * radius + 1) for dx2 in range(-2 * radius, 2 * radius + 1)]
    best_cost = torch.full((n, -(-h // block), -(-w // block)), float("inf"))
    best_idx = torch.zeros(best_cost.shape, dtype=torch.long)
    buf = torch.empty(n, 1, h, w)
    for k, (dy2, dx2) in enumerate(cands):
        cost = _block_cost(gp.at(-dy2, -dx2), gn.at(dy2, dx2), buf, block) + 1e-3 * (abs(dy2) + abs(dx2))
        better = cost < best_cost
        best_cost = torch.where(better, cost, best_cost)
        best_idx = torch.where(better, torch.full_like(best_idx, k), best_idx)
    cp, cn = _HalfPel(prev, pad), _HalfPel(nxt, pad)
    pix_idx = _blocks_to_pixels(best_idx, block, h, w)[:, None]
    out = torch.empty_like(prev)
    for k in torch.unique(best_idx).tolist():
        dy2, dx2 = cands[k]
        out = torch.where(pix_idx == k, 0.5 * (cp.at(-dy2, -dx2) + cn.at(dy2, dx2)), out)
    return out


def block_flow_magnitude(src: torch.Tensor, dst: torch.Tensor, block: int = 8, radius: int = 8) -> torch.Tensor:
    """Per-pixel magnitude of the block-matching flow from ``src`` to ``dst`` ([N, 3, H, W] -> [N, H, W]).

    Each block of ``src`` takes the integer displacement ``d`` (``|d_y|, |d_x| <= radius``) minimising
    ``mean|src(p) - dst(p + d)|`` (on the channel sum) over the block; ties go to the smaller displacement.
    """
    n, _, h, w = src.shape
    s = src.sum(1, keepdim=True)
    pd = F.pad(dst.sum(1, keepdim=True), (radius, radius, radius, radius), mode="replicate")
    best_cost = torch.full((n, -(-h // block), -(-w // block)), float("inf"))
    best_mag = torch.zeros_like(best_cost)
    buf = torch.empty_like(s)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            mag = math.hypot(dy, dx)
            cost = _block_cost(s, _shift(pd, radius, dy, dx, h, w), buf, block) + 1e-3 * mag
            better = cost < best_cost
            best_cost = torch.where(better, cost, best_cost)
            best_mag = torch.where(better, torch.full_like(best_mag, mag), best_mag)
    return _blocks_to_pixels(best_mag, block, h, w)


# ----------------------------------------------------------------------------------------------
# motion smoothness and dynamic degree (proxies)
# ----------------------------------------------------------------------------------------------


def motion_smoothness_proxy(
    video: VideoLike, block: int = 8, radius: int = 4, max_side: int | None = 96
) -> float:
    """VBench motion smoothness with the AMT interpolator replaced by bilateral block matching.

    Frames ``1, 3, 5, ...`` are predicted from their even neighbours by :func:`interpolate_middle` at a working
    resolution whose short side is at most ``max_side`` (``None``: full resolution); the score is
    ``(255 - mean |frame - prediction|) / 255`` over all predicted frames. Needs at least 3 frames.
    """
    v = work_frames(video, max_side, min_frames=3)
    even = v[0::2]
    count = min(len(even) - 1, v[1::2].shape[0])
    pred = interpolate_middle(even[:count], even[1 : count + 1], block=block, radius=radius)
    mae = (v[1::2][:count] - pred).abs().mean().item()
    return float((255.0 - mae) / 255.0)


def flow_scores_proxy(
    video: VideoLike, fps: float = 8.0, block: int = 8, max_side: int | None = 96, radius: int | None = None
) -> tuple[np.ndarray, float, int]:
    """Per-pair "large motion" scores of VBench's dynamic degree, with block matching instead of RAFT.

    Returns ``(scores, threshold, count_needed)``: ``scores[k]`` is the mean of the largest 5 % per-pixel flow
    magnitudes between kept frames ``k`` and ``k + 1`` (frames subsampled by ``max(1, round(fps / 8))``),
    ``threshold = max(1, 8 / fps) * 6 * min(h, w) / 256`` in working-resolution pixels and
    ``count_needed = max(1, round(4 * kept / 16))``. The block search covers ``radius`` pixels (default:
    ``max(8, 2 * threshold + 1)``; larger motions are under-estimated but still exceed the threshold) and
    the top 5 % are taken over the blocks at least ``radius`` from the border (whose content cannot have
    left the frame), when the frame is large enough.
    """
    if not fps > 0:
        raise ValueError(f"fps must be positive; got {fps}.")
    v = work_frames(video, max_side, min_frames=2)
    interval = max(1, round(fps / 8.0))
    v = v[::interval]
    if v.shape[0] < 2:
        raise ValueError(f"dynamic degree needs at least 2 frames after subsampling by {interval}.")
    h, w = v.shape[-2:]
    threshold = max(1.0, 8.0 / fps) * 6.0 * (min(h, w) / 256.0)
    if radius is None:
        radius = max(8, math.ceil(2.0 * threshold) + 1)
    mags = block_flow_magnitude(v[:-1], v[1:], block=block, radius=radius)
    # blocks nearer to the border than the search radius may have left the frame: keep the interior
    m = -(-radius // block) * block
    if h - 2 * m >= block and w - 2 * m >= block:
        mags = mags[:, m : h - m, m : w - m]
    mags = mags.flatten(1)
    cut = max(1, int(mags.shape[1] * 0.05))
    scores = mags.sort(dim=1, descending=True).values[:, :cut].mean(1).numpy().astype(np.float64)
    count_needed = max(1, round(4 * (v.shape[0] / 16.0)))
    return scores, float(threshold), int(count_needed)


def dynamic_degree_proxy(video: VideoLike, fps: float = 8.0, max_side: int | None = 96) -> bool:
    """True when the video counts as dynamic under VBench's rule (see :func:`flow_scores_proxy`)."""
    scores, threshold, needed = flow_scores_proxy(video, fps=fps, max_side=max_side)
    return bool((scores > threshold).sum() >= needed)


# ----------------------------------------------------------------------------------------------
# consistency (VBench formula) and weight-free features
# ----------------------------------------------------------------------------------------------


def combine_consistency(sim_prev: torch.Tensor, sim_first: torch.Tensor) -> np.ndarray:
    """VBench's per-frame consistency from similarities to the previous and the first frame."""
    return ((sim_prev.double().clamp(0.0, 1.0) + sim_first.double().clamp(0.0, 1.0)) / 2).numpy()


def consistency_scores(features: torch.Tensor | np.ndarray) -> np.ndarray:
    """VBench consistency per frame ``i >= 1``: ``(max(0, cos(f_{i-1}, f_i)) + max(0, cos(f_0, f_i))) / 2``."""
    f = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    f = F.normalize(f.double().flatten(1), dim=-1)
    if f.shape[0] < 2:
        raise ValueError(f"consistency needs at least 2 frames; got {f.shape[0]}.")
    return combine_consistency((f[1:] * f[:-1]).sum(-1), (f[1:] * f[:1]).sum(-1))


def aligned_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Translation-compensated similarity of frames ``a``, ``b`` ([N, C, s, s], mean already removed).

    The maximum over all circular shifts of the normalised cross-correlation (computed with the FFT): 1 for
    a translated copy, near 0 for unrelated content. Flat frames (RMS below half a grey level on the [0, 1]
    scale): two flat frames give 1, one gives 0.
    """
    na, nb = a.flatten(1).norm(dim=1), b.flatten(1).norm(dim=1)
    cross = torch.fft.ifft2(torch.fft.fft2(a) * torch.fft.fft2(b).conj()).real.sum(1).flatten(1).amax(1)
    sim = cross / (na * nb).clamp_min(1e-12)
    flat = 0.5 / 255.0 * math.sqrt(a[0].numel())
    fa, fb = na < flat, nb < flat
    return torch.where(fa & fb, torch.ones_like(sim), torch.where(fa | fb, torch.zeros_like(sim), sim))


def subject_consistency_proxy_scores(video: VideoLike, size: int = 32) -> np.ndarray:
    """Weight-free subject consistency per frame ``i >= 1``: VBench's formula with :func:`aligned_similarity`
    of the mean-removed frames, area-downsampled to ``size`` x ``size``, in place of the DINO cosine."""
    v = work_frames(video, max_side=4 * size, min_frames=2).double() / 255.0
    small = F.interpolate(v, size=(size, size), mode="area")
    small = small - small.mean(dim=(2, 3), keepdim=True)
    prev = aligned_similarity(small[:-1], small[1:])
    first = aligned_similarity(small[:1].expand_as(small[1:]), small[1:])
    return combine_consistency(prev, first)


def histogram_features(video: VideoLike, bins: int = 8, max_side: int | None = 128) -> torch.Tensor:
    """Global colour features: joint RGB histogram with ``bins`` levels per channel, ``[F, bins ** 3]``."""
    v = work_frames(video, max_side)
    q = (v / 256.0 * bins).floor().clamp(0, bins - 1).long()
    idx = ((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]).flatten(1)
    hist = torch.zeros(v.shape[0], bins**3, dtype=torch.float64)
    hist.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float64))
    return hist / hist.sum(1, keepdim=True)


def subject_consistency_proxy(video: VideoLike) -> float:
    """Weight-free subject consistency of one video (mean of :func:`subject_consistency_proxy_scores`)."""
    return float(subject_consistency_proxy_scores(video).mean())


def background_consistency_proxy_scores(video: VideoLike) -> np.ndarray:
    """Weight-free background consistency per frame ``i >= 1``: VBench formula on :func:`histogram_features`."""
    return consistency_scores(histogram_features(video))


def background_consistency_proxy(video: VideoLike) -> float:
    """Weight-free background consistency of one video (mean of the per-frame scores)."""
    return float(background_consistency_proxy_scores(video).mean())


# ----------------------------------------------------------------------------------------------
# network versions (local weights only)
# ----------------------------------------------------------------------------------------------


def _check_dir(path: str | os.PathLike[str], what: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        state = "is a file, not a model folder" if os.path.exists(path) else "does not exist"
        raise ValueError(f"{what}: model directory {path!r} {state}.")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{what}: {path!r} has no config.json (expected a transformers save_pretrained folder).")
    return path


def _resize_short(x: torch.Tensor, size: int, mode: str, antialias: bool) -> torch.Tensor:
    """Resize [N, C, H, W] so that the short side is ``size`` (aspect kept)."""
    h, w = x.shape[-2:]
    if h <= w:
        out = (size, max(1, int(size * w / h)))
    else:
        out = (max(1, int(size * h / w)), size)
    kwargs: dict[str, Any] = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=out, mode=mode, antialias=antialias, **kwargs)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _pooled(out: Any) -> torch.Tensor:
    """Embedding tensor from ``get_*_features`` (a tensor in transformers 4, an output object in 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class DinoEncoder:
    """DINO / DINOv2 frame features for subject consistency (VBench uses DINO ViT-B/16; paper Table 1, C.1).

    Loads a ``ViTModel`` / ``Dinov2Model`` folder with ``from_pretrained(dir, local_files_only=True)``.
    Preprocessing follows VBench's ``dino_transform``: short side resized to ``image_size`` (bilinear, no
    antialiasing, aspect kept), ImageNet normalisation; the feature is the final-norm CLS token.
    """

    def __init__(
        self, model_dir: str | os.PathLike[str], device: str = "cpu", image_size: int = 224, batch_size: int = 16
    ) -> None:
        from transformers import AutoConfig, AutoModel

        path = _check_dir(model_dir, "--dino")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            if config.model_type not in ("vit", "dinov2", "dinov2_with_registers"):
                raise ValueError(f"model type {config.model_type!r} is not a ViT/DINOv2 model")
            self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"--dino: cannot load a DINO/ViT model from {path!r}: {e}") from e
        self.device = device
        self.image_size = image_size
        self.batch_size = batch_size
        self._interp = config.model_type == "vit"

    @torch.no_grad()
    def features(self, video: VideoLike) -> torch.Tensor:
        """L2-normalised CLS features ``[F, D]`` (float32, CPU)."""
        arr = as_video_array(video)
        out = []
        for i in range(0, len(arr), self.batch_size):
            x = _chunk_255(arr, i, i + self.batch_size) / 255.0
            x = _resize_short(x, self.image_size, "bilinear", antialias=False)
            x = _normalise(x, IMAGENET_MEAN, IMAGENET_STD).to(self.device)
            kwargs = {"interpolate_pos_encoding": True} if self._interp else {}
            hidden = self.model(pixel_values=x, **kwargs).last_hidden_state[:, 0]
            out.append(F.normalize(hidden.float(), dim=-1).cpu())
        return torch.cat(out)


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


class ClipEncoder:
    """CLIP image and text embeddings (VBench background consistency, aesthetic quality; paper B.1, C.1).

    Loads a ``CLIPModel`` folder (and its tokenizer, if present) with ``local_files_only=True``.
    Preprocessing follows VBench's ``clip_transform``: bicubic resize of the short side to the vision
    tower's image size, centre crop, CLIP normalisation.
    """

    def __init__(self, model_dir: str | os.PathLike[str], device: str = "cpu", batch_size: int = 16) -> None:
        from transformers import AutoTokenizer, CLIPModel

        path = _check_dir(model_dir, "--clip")
        try:
            from transformers import AutoConfig

            model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
            if model_type != "clip":  # CLIPModel.from_pretrained would load another model's folder as random CLIP
                raise ValueError(f"model type {model_type!r} is not a CLIP model")
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"--clip: cannot load a CLIPModel from {path!r}: {e}") from e
        self.tokenizer: Any = None
        if any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError, KeyError, TypeError):
                self.tokenizer = None
        self.device = device
        self.batch_size = batch_size
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_text_len = int(self.model.config.text_config.max_position_embeddings)
        self.dim = int(self.model.config.projection_dim)
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def image_features(self, video: VideoLike) -> torch.Tensor:
        """L2-normalised image embeddings ``[F, D]`` (float32, CPU)."""
        arr = as_video_array(video)
        out = []
        for i in range(0, len(arr), self.batch_size):
            x = _chunk_255(arr, i, i + self.batch_size) / 255.0
            x = _resize_short(x, self.image_size, "bicubic", antialias=True)
            x = _normalise(_center_crop(x, self.image_size), CLIP_MEAN, CLIP_STD).to(self.device)
            emb = _pooled(self.model.get_image_features(pixel_values=x))
            out.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, prompt: str) -> torch.Tensor:
        """L2-normalised text embedding ``[D]`` of ``prompt`` (truncated to the text tower's length)."""
        if self.tokenizer is None:
            raise ValueError("the CLIP folder has no tokenizer files, so text embeddings are unavailable.")
        if prompt not in self._text_cache:
            tok = self.tokenizer(prompt, truncation=True, max_length=self.max_text_len, return_tensors="pt")
            kwargs = {"input_ids": tok["input_ids"].to(self.device)}
            if "attention_mask" in tok:
                kwargs["attention_mask"] = tok["attention_mask"].to(self.device)
            emb = _pooled(self.model.get_text_features(**kwargs))
            self._text_cache[prompt] = F.normalize(emb.float(), dim=-1)[0].cpu()
        return self._text_cache[prompt]


def _layer_order(prefix: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", prefix))


class AestheticHead:
    """LAION-style aesthetic predictor on normalised CLIP image embeddings (VBench aesthetic quality).

    The safetensors file holds one or more linear layers (``weight [out, in]`` and optional ``bias``); they
    are applied in the numeric order of their key prefixes, with no activation in between, as in both LAION
    heads (``sa_0_4_vit_l_14_linear``: 768 -> 1; the "improved" MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors.torch import load_file

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"--aesthetic: file {path!r} does not exist.")
        try:
            state = load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"--aesthetic: cannot read {path!r} as safetensors: {e}") from e
        prefixes = sorted(
            (k[: -len("weight")] for k, t in state.items() if k.endswith("weight") and t.ndim == 2),
            key=_layer_order,
        )
        if not prefixes:
            raise ValueError(f"--aesthetic: {path!r} holds no linear layer weights.")
        self.layers: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for p in prefixes:
            w = state[p + "weight"].double()
            b = state.get(p + "bias")
            if self.layers and self.layers[-1][0].shape[0] != w.shape[1]:
                raise ValueError(f"--aesthetic: layer {p!r} does not chain with the previous layer.")
            self.layers.append((w, None if b is None else b.double()))
        if self.layers[-1][0].shape[0] != 1:
            raise ValueError("--aesthetic: the last layer must have one output.")
        self.in_dim = int(self.layers[0][0].shape[1])

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Raw head output (about 1..10) for normalised embeddings ``[N, D]`` -> ``[N]``."""
        x = embeddings.double()
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"aesthetic head expects {self.in_dim}-d CLIP embeddings; got {x.shape[-1]}-d.")
        for w, b in self.layers:
            x = x @ w.T + (0 if b is None else b)
        return x[:, 0]


def subject_consistency(video: VideoLike, dino: DinoEncoder) -> np.ndarray:
    """VBench subject consistency per frame ``i >= 1`` on DINO features (mean it for the video score)."""
    return consistency_scores(dino.features(video))


def background_consistency(video: VideoLike, clip: ClipEncoder) -> np.ndarray:
    """VBench background consistency per frame ``i >= 1`` on CLIP image features."""
    return consistency_scores(clip.image_features(video))


def middle_frame_indices(num_frames: int, count: int = 8) -> list[int]:
    """VBench's "middle" sampling: split ``[0, num_frames)`` into ``min(count, num_frames)`` equal integer
    intervals and take the middle of each."""
    n = min(count, num_frames)
    edges = np.linspace(0, num_frames, n + 1).astype(int)
    return [int((edges[i] + edges[i + 1] - 1) // 2) for i in range(n)]


def overall_consistency(video: VideoLike, prompt: str, clip: ClipEncoder, num_frames: int = 8) -> float:
    """Text-video cosine with CLIP in place of ViCLIP (8 "middle" frames, mean embedding re-normalised)."""
    arr = as_video_array(video)
    idx = middle_frame_indices(len(arr), num_frames)
    emb = F.normalize(clip.image_features(arr[idx]).mean(0), dim=-1)
    return float(emb @ clip.text_features(prompt))


def aesthetic_quality(video: VideoLike, clip: ClipEncoder, head: AestheticHead) -> float:
    """VBench aesthetic quality: mean over frames of ``head(normalised CLIP embedding) / 10``."""
    return float((head(clip.image_features(video)) / 10.0).mean())


__all__ = [
    "AestheticHead",
    "ClipEncoder",
    "DinoEncoder",
    "aesthetic_quality",
    "aligned_similarity",
    "as_video_array",
    "background_consistency",
    "background_consistency_proxy",
    "background_consistency_proxy_scores",
    "block_flow_magnitude",
    "combine_consistency",
    "consistency_scores",
    "dynamic_degree_proxy",
    "flow_scores_proxy",
    "histogram_features",
    "interpolate_middle",
    "middle_frame_indices",
    "motion_smoothness_proxy",
    "overall_consistency",
    "subject_consistency",
    "subject_consistency_proxy",
    "subject_consistency_proxy_scores",
    "temporal_flickering",
    "work_frames",
]
