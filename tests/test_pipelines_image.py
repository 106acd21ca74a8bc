"""Tests for the image-to-video conditioning image (m4v.pipelines.image): centre crop to the video's aspect, resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from m4v.pipelines.image import fit, image_to_tensor


def test_wide_and_tall_inputs_keep_their_centre_by_hand() -> None:
    wide = torch.arange(8.0).repeat(3, 4, 1)  # [3, 4, 8], column j holds j
    assert torch.equal(fit(wide, 4, 4), wide[:, :, 2:6])  # central 4 of 8 columns, no resize
    tall = torch.arange(8.0)[:, None].repeat(3, 1, 2)  # [3, 8, 2], row i holds i
    assert torch.equal(fit(tall, 2, 2), tall[:, 3:5])


def test_extreme_strip_is_cropped_before_it_is_resized() -> None:
    """A 1 x 100000 strip: its centre pixel fills the frame (resizing first would allocate 100000x the output)."""
    strip = torch.zeros(3, 1, 100_000)
    strip[:, 0, 49_999:50_001] = 0.5  # the two central pixels (the crop takes the left one of an even width)
    out = fit(strip, 16, 16)
    assert out.shape == (3, 16, 16) and torch.allclose(out, torch.full_like(out, 0.5))


def test_resize_matches_torch_on_the_cropped_region() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 60, 90, generator=g)
    want = torch.nn.functional.interpolate(img[None, :, :, 15:75], size=(32, 32), mode="bilinear",
                                           align_corners=False, antialias=True)[0]  # fmt: skip
    assert torch.equal(fit(img, 32, 32), want)


def test_decompression_bomb_is_a_one_line_error(tmp_path, monkeypatch) -> None:
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels > 2 x the limit: PIL refuses to decode
    with pytest.raises(ValueError, match="^image: cannot read"):
        image_to_tensor(str(path), 32, 32)
