"""Tests for the causal video VAE wrapper (m4v.models.vae): shapes, causality, normalisation, chunking, I/O."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import AutoencoderKLLTXVideo

from m4v.models.vae import NORM_CONFIG_KEY, LatentNorm, VideoVAE, build_video_vae

F64 = torch.float64


@pytest.fixture(scope="module")
def tiny() -> VideoVAE:
    torch.manual_seed(0)
    return build_video_vae("tiny", latent_norm=LatentNorm())


def _video(b: int, f: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, h, w, generator=g) * 2 - 1


def test_frame_arithmetic_matches_paper() -> None:
    assert VideoVAE.num_latent_frames(121) == 16
    assert VideoVAE.num_latent_frames(241) == 31
    assert VideoVAE.num_latent_frames(1) == 1
    for k in range(6):
        assert VideoVAE.num_video_frames(VideoVAE.num_latent_frames(1 + 8 * k)) == 1 + 8 * k


@pytest.mark.parametrize("frames", [1, 17])
def test_encode_decode_shapes(tiny: VideoVAE, frames: int) -> None:
    x = _video(2, frames, 16, 24)
    z = tiny.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 16, 1 + (frames - 1) // 8, 2, 3)
    y = tiny.decode(z)
    assert y.shape == x.shape
    assert float(y.min()) >= -1.0 and float(y.max()) <= 1.0


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((1, 3, 18, 32, 32), "num_frames .* nearest valid is 17"),
        ((1, 3, 22, 32, 32), "num_frames .* nearest valid is 25"),
        ((1, 3, 0, 32, 32), "num_frames .* nearest valid is 1"),
        ((1, 3, 9, 60, 32), "height .* nearest valid is 64"),
        ((1, 3, 9, 32, 59), "width .* nearest valid is 56"),
        ((1, 3, 9, 32, 4), "width .* nearest valid is 8"),
        ((1, 4, 9, 32, 32), r"\[B, 3, F, H, W\]"),
    ],
)
def test_invalid_video_shapes(tiny: VideoVAE, shape: tuple[int, ...], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        tiny.encode(torch.zeros(shape))


def test_invalid_latent_shape_and_name(tiny: VideoVAE) -> None:
    with pytest.raises(ValueError, match="latents must be"):
        tiny.decode(torch.zeros(1, 8, 2, 4, 4))
    with pytest.raises(ValueError, match="unknown VAE config"):
        build_video_vae("huge")


def test_encoder_is_causal_and_first_frame_alone(tiny: VideoVAE) -> None:
    x = _video(1, 25, 16, 16)
    z = tiny.encode(x, sample=False, chunk_latents=0)
    for start in (1, 9, 17):  # change frames >= start: latents covering frames < start are unchanged
        x2 = x.clone()
        x2[:, :, start:] = _video(1, 25 - start, 16, 16, seed=start)
        z2 = tiny.encode(x2, sample=False, chunk_latents=0)
        keep = (start - 1) // 8 + 1  # latent j sees frames <= 8j
        torch.testing.assert_close(z2[:, :, :keep], z[:, :, :keep], rtol=0, atol=1e-6)
        assert (z2[:, :, keep] - z[:, :, keep]).abs().max() > 1e-4
    # the first latent frame of a clip equals the encoding of its first frame alone
    z1 = tiny.encode(x[:, :, :1], sample=False)
    torch.testing.assert_close(z1, z[:, :, :1], rtol=0, atol=1e-5)


def test_decoder_is_causal(tiny: VideoVAE) -> None:
    z = torch.randn(1, 16, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    y = tiny.decode_raw(z, chunk_latents=0)
    for j in (1, 2, 3):  # change latents >= j: frames <= 8(j-1) are unchanged
        z2 = z.clone()
        z2[:, :, j:] += 1.0
        y2 = tiny.decode_raw(z2, chunk_latents=0)
        last = 8 * (j - 1)
        torch.testing.assert_close(y2[:, :, : last + 1], y[:, :, : last + 1], rtol=0, atol=1e-6)
        assert (y2[:, :, last + 1] - y[:, :, last + 1]).abs().max() > 1e-4


def test_latent_norm_formula_float64() -> None:
    norm = LatentNorm()
    z = torch.randn(2, 3, 4, 2, 2, dtype=F64)
    out = norm.normalize(z)
    torch.testing.assert_close(out[:, :, 0], (z[:, :, 0] + 0.04) / 1.8726)
    torch.testing.assert_close(out[:, :, 1:], (z[:, :, 1:] + 0.2343) / 3.0986)
    torch.testing.assert_close(norm.denormalize(out), z)


def test_latent_norm_estimate() -> None:
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(4, 16, 5, 8, 8, generator=g, dtype=F64)
    raw[:, :, 0] = raw[:, :, 0] * 2.0 + 0.5
    raw[:, :, 1:] = raw[:, :, 1:] * 3.0 - 1.0
    norm = LatentNorm.estimate(raw)
    z = norm.normalize(raw)
    for part in (z[:, :, :1], z[:, :, 1:]):
        assert abs(float(part.mean())) < 1e-9
        assert abs(float(part.std()) - 1.0) < 1e-9
    with pytest.raises(ValueError, match="unknown keys"):
        LatentNorm.from_dict({"shift": 1.0})


def test_encode_decode_apply_normalisation(tiny: VideoVAE) -> None:
    x = _video(1, 9, 16, 16)
    raw = tiny.encode_raw(x, sample=False)
    z = tiny.encode(x, sample=False)
    torch.testing.assert_close(z[:, :, 0], (raw[:, :, 0] + 0.04) / 1.8726)
    torch.testing.assert_close(z[:, :, 1], (raw[:, :, 1] + 0.2343) / 3.0986)
    ref = tiny.model.decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(tiny.decode(z, chunk_latents=0), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_encode_matches_one_pass(tiny: VideoVAE, chunk: int) -> None:
    x = _video(2, 25, 16, 24, seed=3)
    ref = tiny.model.encode(x).latent_dist.mode()  # the diffusers class in one pass
    got = tiny.encode_raw(x, sample=False, chunk_latents=chunk)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    a = tiny.encode(x, generator=torch.Generator().manual_seed(5), chunk_latents=chunk)
    b = tiny.encode(x, generator=torch.Generator().manual_seed(5), chunk_latents=0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_decode_matches_one_pass(tiny: VideoVAE, chunk: int) -> None:
    z = torch.randn(2, 16, 5, 2, 3, generator=torch.Generator().manual_seed(2))
    ref = tiny.model.decode(z).sample
    got = tiny.decode_raw(z, chunk_latents=chunk)
    assert got.shape == (2, 3, 33, 16, 24)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_chunking_with_residual_upsampler_slicing_and_tiling() -> None:
    torch.manual_seed(1)
    vae = build_video_vae("tiny", upsample_residual=(True,) * 4)
    z = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    x = _video(2, 17, 32, 32, seed=6)
    torch.testing.assert_close(vae.decode_raw(z, chunk_latents=2), vae.model.decode(z).sample, rtol=1e-4, atol=1e-5)
    vae.enable_slicing()
    vae.enable_tiling(
        tile_sample_min_height=24, tile_sample_min_width=24, tile_sample_stride_height=16, tile_sample_stride_width=16
    )
    # with the class's own spatial tiling and batch slicing, streaming over time still matches its one pass
    torch.testing.assert_close(vae.decode_raw(z, chunk_latents=1), vae.model.decode(z).sample, rtol=1e-4, atol=1e-5)
    ref = vae.model.encode(x).latent_dist.mode()
    torch.testing.assert_close(vae.encode_raw(x, sample=False, chunk_latents=1), ref, rtol=1e-4, atol=1e-5)


def test_frozen(tiny: VideoVAE) -> None:
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.model.training
    assert not tiny.encode(_video(1, 1, 8, 8)).requires_grad


def test_save_and_load_round_trip(tmp_path: os.PathLike[str]) -> None:
    torch.manual_seed(0)
    norm = LatentNorm(0.1, 2.0, -0.3, 4.0)
    vae = build_video_vae("tiny", latent_norm=norm)
    vae.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg[NORM_CONFIG_KEY] == norm.to_dict()
    loaded = VideoVAE.from_pretrained(tmp_path)
    assert loaded.latent_norm == norm
    x = _video(1, 9, 16, 16)
    torch.testing.assert_close(loaded.encode(x, sample=False), vae.encode(x, sample=False))
    # the folder is an ordinary diffusers checkpoint
    plain = AutoencoderKLLTXVideo.from_pretrained(tmp_path)
    assert VideoVAE(plain).latent_norm == norm
    with pytest.raises(ValueError, match="missing does not exist"):
        VideoVAE.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        VideoVAE.from_pretrained(tmp_path / "empty")


def test_paper_config() -> None:
    torch.manual_seed(0)
    vae = build_video_vae("m4v-768p")
    assert vae.latent_channels == 16
    assert vae.latent_norm == LatentNorm(0.04, 1.8726, 0.2343, 3.0986)
    n = sum(p.numel() for p in vae.parameters())
    assert 150e6 < n < 400e6
    z = vae.encode(_video(1, 9, 16, 16), sample=False)
    assert z.shape == (1, 16, 2, 2, 2)
