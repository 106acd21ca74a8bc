"""Loading a conditioning image for image-to-video (paper E.2): centre-crop to the video's aspect, resize, scale to
[-1, 1]."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def image_to_tensor(image: Any, height: int, width: int) -> torch.Tensor:
    """A path, PIL image, uint8/float array [H, W, 3] or tensor [3, H, W] in [-1, 1] -> tensor [3, height, width]."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image, UnidentifiedImageError

        if os.path.isdir(image):
            raise ValueError(f"image: {os.fspath(image)!r} is a folder; give an image file")
        if not os.path.isfile(image):
            raise ValueError(f"image: file {os.fspath(image)!r} does not exist")
        try:
            with Image.open(image) as im:
                image = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"image: cannot read {os.fspath(image)!r} ({e})") from None
    if hasattr(image, "convert") and not isinstance(image, (np.ndarray, torch.Tensor)):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
            raise ValueError(f"image: expected a non-empty [H, W, 3] array, got {image.shape}")
        if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"image: a [H, W, 3] array must be uint8 (0-255) or float (0-1), got {image.dtype}")
        arr = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        if image.dtype != np.uint8 and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise ValueError("image: a float array must hold finite values in [0, 1] (use uint8 for 0-255)")
        t = torch.from_numpy(arr).permute(2, 0, 1) * 2 - 1
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or 0 in image.shape:
            raise ValueError(f"image: expected a non-empty [3, H, W] tensor in [-1, 1], got {tuple(image.shape)}")
        t = image.float()
        if not torch.isfinite(t).all():
            raise ValueError("image: the tensor holds NaN or infinite values")
    else:
        raise ValueError(f"image: unsupported type {type(image).__name__}")
    return fit(t, height, width).clamp(-1, 1)


def fit(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[C, H, W] -> [C, height, width]: the centred crop of the video's aspect ratio, resized (bilinear, antialiased).

    Cropping first keeps the work at the output's size whatever the input's shape (a 100000 x 1 strip would need
    a 100000-fold upscale if resized first)."""
    _, H, W = t.shape
    ch, cw = min(H, max(1, round(W * height / width))), min(W, max(1, round(H * width / height)))
    top, left = (H - ch) // 2, (W - cw) // 2
    t = t[:, top : top + ch, left : left + cw]
    if (ch, cw) != (height, width):
        t = F.interpolate(t[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)[0]
    return t
