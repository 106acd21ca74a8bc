"""Tests for the weight-free VBench metrics (m4v.eval.metrics) on videos with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m4v.eval import metrics as M

F, H, W = 17, 64, 64


def _texture(seed: int, h: int = H, w: int = W, lo: int = 0, hi: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, (h, w, 3), dtype=np.uint8)


def _static(seed: int = 0, frames: int = F) -> np.ndarray:
    return np.repeat(_texture(seed)[None], frames, axis=0)


def _flicker(delta: int = 40) -> np.ndarray:
    """Every odd frame is the static frame plus ``delta`` (no clipping: texture values <= 255 - delta)."""
    v = np.repeat(_texture(1, hi=256 - delta)[None], F, axis=0).astype(np.int16)
    v[1::2] += delta
    return v.astype(np.uint8)


def _moving_object(velocity: tuple[int, int], frames: int = F, bg: int = 60, size: int = 16) -> np.ndarray:
    """A textured square moving at constant integer velocity over a flat background."""
    tex = _texture(2, size, size)
    v = np.full((frames, H, W, 3), bg, np.uint8)
    y0, x0 = 24 - 8 * (velocity[1] > 0), 4
    for t in range(frames):
        y, x = y0 + velocity[1] * t, x0 + velocity[0] * t
        v[t, y : y + size, x : x + size] = tex
    return v


def _pan(step: tuple[int, int], frames: int = F, moving: set[int] | None = None) -> np.ndarray:
    """Global translation of a smooth random texture by ``step`` per frame (only at the pairs in ``moving``)."""
    g = torch.Generator().manual_seed(3)
    big = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 4 * H, 4 * W, generator=g) * 255, 3, 1, 1)
    big = big[0].permute(1, 2, 0).numpy()
    out, pos = [], np.array([H, W])
    for t in range(frames):
        if t > 0 and (moving is None or t - 1 in moving):
            pos = pos + np.array([step[1], step[0]])
        out.append(big[pos[0] : pos[0] + H, pos[1] : pos[1] + W])
    return np.stack(out).round().astype(np.uint8)


def _cut(k: int = 9) -> np.ndarray:
    """Scene A (values < 128) for frames < k, an unrelated scene B (values >= 128) afterwards."""
    v = _static(4)
    v[:k] = _texture(5, lo=0, hi=128)
    v[k:] = _texture(6, lo=128, hi=256)
    return v


# ----------------------------------------------------------------------------------------------
# temporal flickering
# ----------------------------------------------------------------------------------------------


def test_flickering_static_is_one() -> None:
    assert M.temporal_flickering(_static()) == 1.0


def test_flickering_every_other_frame_hand_value() -> None:
    # every consecutive pair differs by exactly 40 at every pixel and channel
    assert M.temporal_flickering(_flicker(40)) == pytest.approx((255 - 40) / 255, abs=1e-12)


def test_flickering_matches_float64_loop_and_float_input() -> None:
    v = np.random.default_rng(7).integers(0, 256, (6, 9, 11, 3), dtype=np.uint8)
    ref = np.mean([np.abs(v[i + 1].astype(np.float64) - v[i]).mean() for i in range(5)])
    assert M.temporal_flickering(v) == pytest.approx((255 - ref) / 255, abs=1e-12)
    assert M.temporal_flickering(v.astype(np.float32) / 255) == pytest.approx((255 - ref) / 255, abs=1e-6)
    assert M.temporal_flickering(torch.from_numpy(v)) == pytest.approx((255 - ref) / 255, abs=1e-12)


def test_flickering_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 frames"):
        M.temporal_flickering(_static(frames=1))
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        M.temporal_flickering(np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.temporal_flickering(np.full((3, 8, 8, 3), 2.0))


# ----------------------------------------------------------------------------------------------
# motion smoothness (proxy)
# ----------------------------------------------------------------------------------------------


def test_interpolate_middle_recovers_translation() -> None:
    # prev and next are the middle frame shifted by -d and +d; the interior must be predicted exactly
    tex = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 255
    dy, dx = 2, -3
    mid = tex[..., 8:40, 8:40]
    prev = tex[..., 8 - dy : 40 - dy, 8 - dx : 40 - dx]
    nxt = tex[..., 8 + dy : 40 + dy, 8 + dx : 40 + dx]
    pred = M.interpolate_middle(prev.contiguous(), nxt.contiguous(), block=8, radius=4)
    assert torch.allclose(pred[..., 8:24, 8:24], mid[..., 8:24, 8:24], atol=1e-4)


def test_motion_smoothness_static_and_constant_velocity_are_one() -> None:
    assert M.motion_smoothness_proxy(_static()) == 1.0
    assert M.motion_smoothness_proxy(_moving_object((2, 0))) == pytest.approx(1.0, abs=1e-9)
    assert M.motion_smoothness_proxy(_moving_object((0, 3), frames=11)) == pytest.approx(1.0, abs=1e-9)


def test_motion_smoothness_flicker_hand_value() -> None:
    # even frames are identical, so the predicted odd frames are the even frame: error 40 everywhere
    assert M.motion_smoothness_proxy(_flicker(40)) == pytest.approx((255 - 40) / 255, abs=1e-6)


def test_motion_smoothness_penalises_jerky_motion() -> None:
    smooth = _moving_object((2, 0))
    jerky = smooth.copy()
    jerky[1::2] = smooth[0::2][: len(jerky[1::2])]  # odd frames repeat the previous even frame
    assert M.motion_smoothness_proxy(jerky) < M.motion_smoothness_proxy(smooth) - 0.005


def test_motion_smoothness_needs_three_frames() -> None:
    with pytest.raises(ValueError, match="at least 3 frames"):
        M.motion_smoothness_proxy(_static(frames=2))


# ----------------------------------------------------------------------------------------------
# dynamic degree (proxy)
# ----------------------------------------------------------------------------------------------


def test_flow_scores_measure_the_pan() -> None:
    scores, threshold, needed = M.flow_scores_proxy(_pan((3, 0)), fps=8)
    assert threshold == pytest.approx(6.0 * 64 / 256)  # VBench: factor 1 at 8 fps, scale min(H, W) / 256
    assert needed == round(4 * F / 16)
    np.testing.assert_allclose(scores, 3.0)
    diag, _, _ = M.flow_scores_proxy(_pan((2, -2)), fps=8)
    np.testing.assert_allclose(diag, np.hypot(2, 2), rtol=1e-6)


def test_dynamic_degree_static_slow_fast() -> None:
    assert not M.dynamic_degree_proxy(_static())
    assert not M.dynamic_degree_proxy(_pan((1, 0)))  # 1 px < threshold 1.5 px
    assert M.dynamic_degree_proxy(_pan((3, 0)))
    assert M.dynamic_degree_proxy(_moving_object((3, 0), frames=14))


def test_dynamic_degree_count_rule() -> None:
    # 17 frames -> at least round(4 * 17 / 16) = 4 pairs must exceed the threshold
    assert not M.dynamic_degree_proxy(_pan((3, 0), moving={2, 5, 9}))
    assert M.dynamic_degree_proxy(_pan((3, 0), moving={2, 5, 9, 12}))


def test_dynamic_degree_fps_rule() -> None:
    video = _pan((2, 0), frames=25)
    scores, threshold, needed = M.flow_scores_proxy(video, fps=24)  # every 3rd frame is kept
    assert len(scores) == 8 and needed == round(4 * 9 / 16) and threshold == pytest.approx(1.5)
    np.testing.assert_allclose(scores, 6.0)
    _, threshold4, _ = M.flow_scores_proxy(video, fps=4)  # below 8 fps the threshold doubles
    assert threshold4 == pytest.approx(3.0)


# ----------------------------------------------------------------------------------------------
# consistency
# ----------------------------------------------------------------------------------------------


def _consistency_loop(feats: np.ndarray) -> np.ndarray:
    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    return np.array(
        [(max(0.0, cos(feats[i - 1], feats[i])) + max(0.0, cos(feats[0], feats[i]))) / 2 for i in range(1, len(feats))]
    )


def test_consistency_scores_match_formula() -> None:
    feats = np.random.default_rng(0).normal(size=(9, 5))  # some cosines are negative and get clamped
    np.testing.assert_allclose(M.consistency_scores(feats), _consistency_loop(feats), atol=1e-12)


def test_consistency_proxies_static_and_moving_object() -> None:
    for video in (_static(), _moving_object((2, 0))):
        assert M.subject_consistency_proxy(video) == pytest.approx(1.0, abs=1e-9)
        assert M.background_consistency_proxy(video) == pytest.approx(1.0, abs=1e-9)


def test_consistency_proxies_on_a_cut() -> None:
    k = 9
    # frames 1..k-1 score 1, frame k scores ~0 (new scene), frames k+1.. score 1/2 (like the previous frame only)
    expected = ((k - 1) + 0.0 + 0.5 * (F - 1 - k)) / (F - 1)
    assert M.background_consistency_proxy(_cut(k)) == pytest.approx(expected, abs=1e-12)  # disjoint histograms
    assert M.subject_consistency_proxy(_cut(k)) == pytest.approx(expected, abs=0.03)


def test_aligned_similarity_flat_frames() -> None:
    flat = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    tex = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    tex = tex - tex.mean(dim=(2, 3), keepdim=True)
    assert M.aligned_similarity(flat, flat).item() == 1.0
    assert M.aligned_similarity(flat, tex).item() == 0.0
    assert M.aligned_similarity(tex, torch.roll(tex, (3, -2), dims=(2, 3))).item() == pytest.approx(1.0)


def test_middle_frame_indices() -> None:
    assert M.middle_frame_indices(17) == [0, 2, 4, 6, 8, 10, 12, 15]
    assert M.middle_frame_indices(5) == [0, 1, 2, 3, 4]
    assert M.middle_frame_indices(121) == [7, 22, 37, 52, 67, 82, 97, 112]
