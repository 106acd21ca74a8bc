"""Tests of the pyramidal flow-matching scheduler and the pyramid/noise utilities (paper Sec. 3.1, A.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m4v.schedulers import (
    PyramidFlowMatchScheduler,
    PyramidFlowSchedulerOutput,
    block_noise,
    constant_corruption_sigmas,
    corrupt,
    downsample,
    linear_corruption_sigmas,
    pyramid_noise,
    temporal_pyramid_history,
    upsample_nearest,
)

GAMMA = 1.0 / 3.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """Aligned 2x2 blocks of the last two dims as rows of 4 (row-major inside the block)."""
    h, w = x.shape[-2:]
    b = x.reshape(-1, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4)
    return b.reshape(-1, 4)


def _cov(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.double()
    rows = rows - rows.mean(0, keepdim=True)
    return rows.T @ rows / (rows.shape[0] - 1)


# ---------------------------------------------------------------- windows and transition constants


def test_stage_windows_match_hand_derivation() -> None:
    sched = PyramidFlowMatchScheduler()
    # Raw boundaries on the training grid 1 - floor(f * 1000) / 1000: 1/3 -> 0.667, 2/3 -> 0.334.
    # Correction s -> 1 - s_c / (sqrt(1 + 1/gamma) (1 - s_c) + s_c), sqrt(1 + 3) = 2.
    s_c1 = 1.0 - 0.667
    s_c2 = 1.0 - 0.334
    start1 = 1.0 - s_c1 / (2.0 * (1.0 - s_c1) + s_c1)
    start2 = 1.0 - s_c2 / (2.0 * (1.0 - s_c2) + s_c2)
    expected = [(1.0, 0.667), (start1, 0.334), (start2, 0.0)]
    got = sched.stage_windows
    assert len(got) == 3
    for (gs, ge), (es, ee) in zip(got, expected):
        assert gs == pytest.approx(es, abs=1e-9)
        assert ge == pytest.approx(ee, abs=1e-9)
    # and the published numbers
    for (gs, ge), (es, ee) in zip(got, [(1.0, 0.667), (0.80024, 0.334), (0.50075, 0.0)]):
        assert abs(gs - es) < 1e-4 and abs(ge - ee) < 1e-4


def test_transition_coefficients_match_hand_derivation() -> None:
    sched = PyramidFlowMatchScheduler()
    for stage, raw, a_pub, b_pub in [(1, 0.667, 0.59988, 0.69303), (2, 0.334, 0.74963, 0.43366)]:
        s_c = 1.0 - raw
        a = 1.0 / (2.0 * (1.0 - s_c) + s_c)
        b = a * (1.0 - s_c) / math.sqrt(1.0 / 3.0)
        ga, gb = sched.transition_coefficients(stage)
        assert ga == pytest.approx(a, abs=1e-9) and gb == pytest.approx(b, abs=1e-9)
        assert abs(ga - a_pub) < 1e-4 and abs(gb - b_pub) < 1e-4
        # the corrected start is what the jump produces: clean part a * s_c, noise std a * 2 * (1 - s_c)
        start = sched.stage_windows[stage][0]
        assert 1.0 - a * s_c == pytest.approx(start, abs=1e-9)
        assert math.sqrt(a**2 * (1 - s_c) ** 2 * (1 + 1 / GAMMA)) == pytest.approx(start, abs=1e-9)
    with pytest.raises(ValueError):
        sched.transition_coefficients(0)


def test_set_timesteps_grids() -> None:
    sched = PyramidFlowMatchScheduler()
    sched.set_timesteps([3, 4, 5])
    for k, n in enumerate([3, 4, 5]):
        s, e = sched.stage_windows[k]
        sig = sched.sigmas_for_stage(k)
        ref = torch.tensor([s + (e - s) * i / n for i in range(n + 1)], dtype=torch.float32)
        torch.testing.assert_close(sig, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(sched.timesteps_for_stage(k), ref[:-1] * 1000, atol=1e-3, rtol=0)
    assert sched.timesteps.shape == (12,)
    sched.set_timesteps(2)
    assert [sched.sigmas_for_stage(k).numel() for k in range(3)] == [3, 3, 3]
    with pytest.raises(ValueError):
        sched.set_timesteps([2, 2])
    with pytest.raises(ValueError):
        PyramidFlowMatchScheduler().step(torch.zeros(1), 0, 0, torch.zeros(1))


def test_invalid_config_raises() -> None:
    with pytest.raises(ValueError):
        PyramidFlowMatchScheduler(stage_range=[0.0, 0.5, 1.0])
    with pytest.raises(ValueError):
        PyramidFlowMatchScheduler(stage_range=[0.0, 0.6, 0.5, 1.0])
    with pytest.raises(ValueError):
        PyramidFlowMatchScheduler(gamma=0.5)


def test_save_load_round_trip(tmp_path) -> None:
    sched = PyramidFlowMatchScheduler(
        num_stages=2, gamma=0.25, stage_range=[0.0, 0.4, 1.0], num_train_timesteps=500
    )
    sched.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").is_file()
    loaded = PyramidFlowMatchScheduler.from_pretrained(tmp_path)
    assert loaded.config.num_stages == 2
    assert loaded.config.gamma == 0.25
    assert list(loaded.config.stage_range) == [0.0, 0.4, 1.0]
    assert loaded.config.num_train_timesteps == 500
    assert loaded.stage_windows == sched.stage_windows
    # hand check of the loaded windows: raw 1 - 200/500 = 0.6, s_c = 0.4, sqrt(1 + 4) = sqrt(5)
    assert loaded.stage_windows[1][0] == pytest.approx(1 - 0.4 / (math.sqrt(5) * 0.6 + 0.4), abs=1e-12)


# ---------------------------------------------------------------- pyramid utilities


def test_downsample_is_bilinear_half_and_upsample_is_nearest() -> None:
    x = torch.randn(2, 3, 16, 24, generator=_gen(0), dtype=torch.float64)
    ref1 = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    torch.testing.assert_close(downsample(x, 1), ref1)
    ref2 = F.interpolate(ref1, scale_factor=0.5, mode="bilinear", align_corners=False)
    torch.testing.assert_close(downsample(x, 2), ref2)
    torch.testing.assert_close(upsample_nearest(x, 1), F.interpolate(x, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(upsample_nearest(x, 2), F.interpolate(x, scale_factor=4, mode="nearest"))
    # works on 5D video latents (last two dims)
    assert downsample(x[:, :, None], 2).shape == (2, 3, 1, 4, 6)
    with pytest.raises(ValueError):
        downsample(torch.zeros(1, 1, 6, 8), 2)


def test_pyramid_noise_unit_variance() -> None:
    noise = torch.randn(8, 4, 64, 64, generator=_gen(1))
    torch.testing.assert_close(pyramid_noise(noise, 2), noise)
    for stage, size in [(0, 16), (1, 32)]:
        eps = pyramid_noise(noise, stage)
        assert eps.shape == (8, 4, size, size)
        assert abs(eps.std().item() - 1.0) < 0.02
        assert abs(eps.mean().item()) < 0.02
        # still white at its own resolution
        c = _cov(_blocks(eps))
        assert (c - torch.eye(4, dtype=c.dtype)).abs().max().item() < 0.05


def test_block_noise_covariance() -> None:
    n = block_noise((64, 16, 32, 32), GAMMA, _gen(2))
    c = _cov(_blocks(n))
    ref = (1 + GAMMA) * torch.eye(4, dtype=c.dtype) - GAMMA * torch.ones(4, 4, dtype=c.dtype)
    assert (c - ref).abs().max().item() < 0.02
    # independent across blocks: pixel (0, 1) of one block vs pixel (0, 0) of its right neighbour
    right = (n[..., 0::2, 1::2][..., :, :-1].flatten(), n[..., 0::2, 2::2].flatten())
    assert abs(torch.corrcoef(torch.stack(right))[0, 1].item()) < 0.01
    # gamma = 0 is white noise; gamma > 1/3 is not a covariance
    c0 = _cov(_blocks(block_noise((16, 16, 32, 32), 0.0, _gen(3))))
    assert (c0 - torch.eye(4, dtype=c0.dtype)).abs().max().item() < 0.03
    with pytest.raises(ValueError):
        block_noise((2, 4, 4), 0.4, _gen(0))


@pytest.mark.parametrize("next_stage", [1, 2])
def test_transition_keeps_white_noise_and_clean_fraction(next_stage: int) -> None:
    sched = PyramidFlowMatchScheduler()
    e = sched.stage_windows[next_stage - 1][1]
    s_next = sched.stage_windows[next_stage][0]
    g = _gen(10 + next_stage)
    c = torch.randn(64, 8, 16, 16, generator=g)  # clean, independent of the noise
    eps = torch.randn(64, 8, 16, 16, generator=g)
    x = e * eps + (1 - e) * c  # end of the previous stage
    y = sched.renoise_for_next_stage(x, next_stage, generator=g)
    up_c = upsample_nearest(c, 1)
    assert y.shape == (64, 8, 32, 32)
    coef = ((y * up_c).sum() / (up_c * up_c).sum()).item()  # empirical clean coefficient
    assert abs(coef - (1 - s_next)) < 0.01
    resid = y - (1 - s_next) * up_c
    assert abs(resid.std().item() - s_next) < 0.01
    cov = _cov(_blocks(resid)) / s_next**2
    assert (cov - torch.eye(4, dtype=cov.dtype)).abs().max().item() < 0.03  # white: block correlation gone


def test_temporal_pyramid_history_shapes() -> None:
    full = 16
    for n in [0, 1, 2, 5]:
        frames = [torch.randn(2, 4, full, full, generator=_gen(20 + i)) for i in range(n)]
        for stage in range(3):
            hist = temporal_pyramid_history(frames, stage)
            assert len(hist) == n
            for i, h in enumerate(hist):
                if stage == 2:
                    size = full if i == n - 1 else (full // 2 if i == n - 2 else full // 4)
                elif stage == 1:
                    size = full // 2 if i == n - 1 else full // 4
                else:
                    size = full // 4
                assert h.shape == (2, 4, size, size), (n, stage, i)
                torch.testing.assert_close(h, downsample(frames[i], int(math.log2(full // size))))


# ---------------------------------------------------------------- history corruption (A.3)


def test_linear_corruption_sigmas() -> None:
    eta = 1.0 / 3.0
    sig = linear_corruption_sigmas(6, eta, _gen(30), batch_size=20000)
    assert sig.shape == (20000, 6)
    assert (sig >= 0).all() and (sig <= eta).all()
    d = sig[:, 1:] - sig[:, :-1]
    assert (d >= -1e-7).all()  # oldest frame least noisy, newest most
    torch.testing.assert_close(d, d[:, :1].expand_as(d), atol=1e-6, rtol=0)  # linear spacing
    eta_max, eta_min = sig[:, -1], sig[:, 0]
    assert abs(eta_max.mean().item() - eta / 2) < 0.005
    assert abs(eta_max.var().item() - eta**2 / 12) < 0.001
    assert abs(eta_min.mean().item() - eta / 4) < 0.005  # E[U(0, U(0, eta))] = eta / 4
    assert (eta_max.max().item() > 0.95 * eta) and (eta_max.min().item() < 0.05 * eta)
    one = linear_corruption_sigmas(1, eta, _gen(31), batch_size=4000)
    assert abs(one.mean().item() - eta / 2) < 0.01  # a lone (newest) frame gets eta_max
    assert linear_corruption_sigmas(3, eta, _gen(32)).shape == (3,)


def test_constant_corruption_sigmas() -> None:
    sig = constant_corruption_sigmas(4, 1.0 / 3.0, _gen(33), batch_size=20000)
    assert (sig == sig[:, :1]).all()
    assert (sig >= 0).all() and (sig <= 1.0 / 3.0).all()
    assert abs(sig.mean().item() - 1.0 / 6.0) < 0.005


def test_corrupt() -> None:
    frames = [torch.full((3, 2, 8, 8), 2.0), torch.full((3, 2, 16, 16), -1.0)]
    sig = torch.tensor([[0.0, 1.0], [0.5, 0.25], [1.0, 0.0]])
    out = corrupt(frames, sig, _gen(34))
    assert [o.shape for o in out] == [f.shape for f in frames]
    torch.testing.assert_close(out[0][0], frames[0][0])
    torch.testing.assert_close(out[1][2], frames[1][2])
    assert abs(out[0][1].mean().item() - 1.0) < 0.15 and abs(out[0][1].std().item() - 0.5) < 0.1
    big = corrupt(torch.zeros(4, 4, 32, 32), 0.3, _gen(35))
    assert abs(big.std().item() - 0.3) < 0.01
    with pytest.raises(ValueError):
        corrupt(frames, torch.zeros(3), _gen(0))


# ---------------------------------------------------------------- training input and sampling


def test_training_input_and_sampler_agree() -> None:
    sched = PyramidFlowMatchScheduler()
    sched.set_timesteps([4, 5, 6])
    g = _gen(40)
    clean = torch.randn(3, 4, 32, 32, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 32, 32, generator=g, dtype=torch.float64)
    for stage in range(3):
        s, e = sched.stage_windows[stage]
        levels = 2 - stage
        eps = downsample(noise, levels) * 2**levels
        c = downsample(clean, levels)
        prev = eps if stage == 0 else upsample_nearest(downsample(clean, levels + 1), 1)
        start_ref = s * eps + (1 - s) * prev
        end_ref = e * eps + (1 - e) * c
        r = torch.tensor([0.0, 0.3, 1.0])
        noisy, target, sigma = sched.sample_training_input(clean, stage, noise, ratio=r)
        rr = r.double().view(-1, 1, 1, 1)
        torch.testing.assert_close(noisy, rr * start_ref + (1 - rr) * end_ref)
        torch.testing.assert_close(target, start_ref - end_ref)
        torch.testing.assert_close(sigma, r * s + (1 - r) * e)
        # r = 1 is the stage's first model timestep
        assert sigma[2].item() * 1000 == pytest.approx(sched.timesteps_for_stage(stage)[0].item(), abs=1e-3)
        # a model that outputs the training target carries the sampler from start exactly to end
        x = start_ref
        for i in range(sched.num_inference_steps[stage]):
            out = sched.step(target, stage, i, x)
            assert isinstance(out, PyramidFlowSchedulerOutput)
            x = out.prev_sample
        torch.testing.assert_close(x, end_ref, atol=1e-6, rtol=0)
    # random ratios stay inside the window
    _, _, sigma = sched.sample_training_input(clean.float(), 1, generator=g)
    s, e = sched.stage_windows[1]
    assert ((sigma <= s + 1e-6) & (sigma >= e - 1e-6)).all()


def _run_pyramid(sched, x, generator, velocity) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sample through all stages; ``velocity(x, sigma, stage)`` plays the model. Returns final, stage ends."""
    ends = []
    for stage in range(sched.config.num_stages):
        if stage > 0:
            x = sched.renoise_for_next_stage(x, stage, generator=generator)
        sig = sched.sigmas_for_stage(stage)
        for i in range(sig.numel() - 1):
            x = sched.step(velocity(x, sig[i].item(), stage), stage, i, x).prev_sample
        ends.append(x)
    return x, ends


def _denoiser_oracle(sched, c_full):
    """Velocity of a model that knows the clean target: with x = sigma eps + (1-sigma) c_k, eps - c_k is
    dx/dsigma, and the scheduler's velocity (dx/dr within the stage) is (s_k - e_k) (eps - c_k)."""

    def velocity(x, sigma, stage):
        s, e = sched.stage_windows[stage]
        c = downsample(c_full, 2 - stage)
        eps_hat = (x - (1 - sigma) * c) / sigma
        return (s - e) * (eps_hat - c)

    return velocity


def test_oracle_sampling_constant_target() -> None:
    sched = PyramidFlowMatchScheduler()
    sched.set_timesteps([5, 4, 3])
    g = _gen(50)
    c_full = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1).expand(2, 4, 32, 32).contiguous()
    x0 = torch.randn(2, 4, 8, 8, generator=g)  # pure noise at 1/4 resolution
    final, ends = _run_pyramid(sched, x0, g, _denoiser_oracle(sched, c_full))
    assert final.shape == c_full.shape
    torch.testing.assert_close(final, c_full, atol=1e-5, rtol=0)
    # at each stage end the noise left is white with std e_k
    for k, end in enumerate(ends[:-1]):
        e = sched.stage_windows[k][1]
        resid = (end - (1 - e) * downsample(c_full, 2 - k)) / e
        assert abs(resid.std().item() - 1.0) < 0.12


def test_oracle_sampling_smooth_target() -> None:
    """Non-constant target. Tolerance: any oracle of the denoiser form v ~ (x - c) / sigma integrates exactly
    to c at sigma = 0, so the final sample equals the target up to float32 round-off (1e-5 on O(1) values).
    The pyramid-aware oracle (which knows up(c_{k-1}) enters the stage start) is also checked at the stage
    ends, where the residual must be unit white noise times e_k."""
    sched = PyramidFlowMatchScheduler()
    sched.set_timesteps([6, 6, 6])
    g = _gen(60)
    hh, ww = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    chans = [torch.sin(2 * math.pi * hh), torch.cos(3 * hh + 2 * ww), hh * ww - 0.5, 0.8 * torch.sin(4 * ww)]
    c_full = torch.stack(chans)[None].expand(4, 4, 64, 64).contiguous()
    x0 = torch.randn(4, 4, 16, 16, generator=g)

    final, _ = _run_pyramid(sched, x0, g, _denoiser_oracle(sched, c_full))
    torch.testing.assert_close(final, c_full, atol=1e-5, rtol=0)

    def pyramid_oracle(x, sigma, stage):
        s, e = sched.stage_windows[stage]
        c = downsample(c_full, 2 - stage)
        prev = torch.zeros_like(c) if stage == 0 else upsample_nearest(downsample(c_full, 3 - stage), 1)
        r = (sigma - e) / (s - e)
        eps_hat = (x - r * (1 - s) * prev - (1 - r) * (1 - e) * c) / sigma
        return (s - e) * eps_hat + (1 - s) * prev - (1 - e) * c

    final2, ends = _run_pyramid(sched, x0, _gen(61), pyramid_oracle)
    torch.testing.assert_close(final2, c_full, atol=1e-5, rtol=0)
    for k, end in enumerate(ends[:-1]):
        e = sched.stage_windows[k][1]
        resid = (end - (1 - e) * downsample(c_full, 2 - k)) / e
        assert abs(resid.mean().item()) < 0.05
        assert abs(resid.std().item() - 1.0) < 0.05
        cov = _cov(_blocks(resid))
        assert (cov - torch.eye(4, dtype=cov.dtype)).abs().max().item() < 0.1


def test_block_noise_with_one_generator_per_batch_element() -> None:
    """A list of generators draws element i from generator i: the same noise as drawing it alone."""
    from m4v.schedulers.pyramid import block_noise

    gens = [torch.Generator().manual_seed(s) for s in (3, 7)]
    both = block_noise((2, 4, 6, 6), 1 / 3, gens)
    for i, s in enumerate((3, 7)):
        alone = block_noise((1, 4, 6, 6), 1 / 3, torch.Generator().manual_seed(s))
        torch.testing.assert_close(both[i : i + 1], alone, rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        block_noise((3, 4, 6, 6), 1 / 3, [torch.Generator(), torch.Generator()])
