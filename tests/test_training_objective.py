"""Pyramidal flow matching with the temporal pyramid and A.3 history corruption, against a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m4v.models.text_encoders import TextEmbeddings
from m4v.schedulers import PyramidFlowMatchScheduler
from m4v.training.objective import PyramidFlowObjective, token_count
from m4v.training.text import HashTextEncoder, apply_text_dropout, pad_text, stack_text, unbatch_text

ETA = 1.0 / 3.0


def _pool(x: torch.Tensor, f: int) -> torch.Tensor:
    return F.avg_pool2d(x, f) if f > 1 else x


def _up(x: torch.Tensor, f: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=f, mode="nearest") if f > 1 else x


def _reference(latents, frame_index, stage, seeds, corruption, windows, dropout):
    """Float64 re-derivation of one example per sample, replaying the documented draw order."""
    B, C, T, H, W = latents.shape
    x = latents.double()
    out = {"noisy": [], "target": [], "sigma": [], "hist": [], "drop": []}
    s, e = windows[stage]
    fac = 2 ** (2 - stage)  # downsampling factor of the current frame at this stage
    for j in range(B):
        g = torch.Generator().manual_seed(seeds[j])
        drop = bool(torch.rand((), generator=g) < dropout)
        r = float(torch.rand((), generator=g))
        noise = torch.randn(C, H, W, generator=g).double()[None]
        hist = []
        if frame_index:
            if corruption == "linear":
                u = torch.rand((1, 2), generator=g)[0].double()
                hi = float(u[0]) * ETA
                lo = float(u[1]) * hi
                sig = [hi] if frame_index == 1 else [lo + (hi - lo) * k / (frame_index - 1) for k in range(frame_index)]
            else:
                sig = [float(torch.rand((1, 1), generator=g)[0, 0]) * ETA] * frame_index
            for f in range(frame_index):
                back = frame_index - f  # 1 = newest history frame
                levels = min((2 - stage) + back - 1, 2)
                frame = _pool(x[j : j + 1, :, f], 2**levels)
                n = torch.randn(frame.shape, generator=g).double()
                hist.append(sig[f] * n + (1 - sig[f]) * frame)
        eps = _pool(noise, fac) * fac
        clean = _pool(x[j : j + 1, :, frame_index], fac)
        end = e * eps + (1 - e) * clean
        start = eps if stage == 0 else s * eps + (1 - s) * _up(_pool(x[j : j + 1, :, frame_index], 2 * fac), 2)
        out["noisy"].append(r * start + (1 - r) * end)
        out["target"].append(start - end)
        out["sigma"].append(r * s + (1 - r) * e)
        out["hist"].append(hist)
        out["drop"].append(drop)
    return out


def _text(B: int) -> TextEmbeddings:
    enc = HashTextEncoder(dim=8)
    return enc([f"prompt number {i} " + "word " * i for i in range(B)])


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("corruption", ["linear", "constant"])
def test_prepare_matches_float64_reference(stage, corruption):
    torch.manual_seed(0)
    B, C, T, H, W = 3, 2, 5, 16, 16
    latents = torch.randn(B, C, T, H, W)
    sched = PyramidFlowMatchScheduler()
    obj = PyramidFlowObjective(sched, corruption=corruption, corruption_eta=ETA, text_dropout=0.3)
    text = _text(B)
    null = HashTextEncoder(dim=8)([""])
    seeds = [11, 22, 33]
    for frame_index in (0, 1, 4):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        inp = obj.prepare(latents, frame_index, stage, text, null, gens)
        ref = _reference(latents, frame_index, stage, seeds, corruption, sched.stage_windows, 0.3)
        torch.testing.assert_close(inp.noisy.double(), torch.cat(ref["noisy"]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inp.target.double(), torch.cat(ref["target"]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inp.sigma.double(), torch.tensor(ref["sigma"], dtype=torch.float64))
        assert len(inp.history) == frame_index
        for f in range(frame_index):
            expect = torch.cat([h[f] for h in ref["hist"]])
            torch.testing.assert_close(inp.history[f].double(), expect, atol=1e-5, rtol=1e-5)
        assert inp.dropped.tolist() == ref["drop"]


def test_temporal_pyramid_resolutions_of_eq4():
    B, C, T, H, W = 1, 2, 6, 16, 16
    obj = PyramidFlowObjective(corruption="none", text_dropout=0.0)
    latents = torch.randn(B, C, T, H, W)
    text = _text(B)
    sizes = {}
    for stage in range(3):
        inp = obj.prepare(latents, 5, stage, text, None, [torch.Generator().manual_seed(0)])
        sizes[stage] = [h.shape[-1] for h in inp.history] + [inp.noisy.shape[-1]]
    assert sizes[2] == [4, 4, 4, 8, 16, 16]  # 0..n-3 at 1/4, n-2 at 1/2, n-1 and current at full
    assert sizes[1] == [4, 4, 4, 4, 8, 8]
    assert sizes[0] == [4, 4, 4, 4, 4, 4]
    # corruption "none": the history is exactly the pooled clean frames
    torch.testing.assert_close(inp.history[3], F.avg_pool2d(latents[:, :, 3], 2))  # stage 2 (last loop)
    torch.testing.assert_close(inp.history[4], latents[:, :, 4])
    assert token_count([(4, 4), (8, 8), (16, 16)], 10, 2) == 10 + 4 + 16 + 64


def test_linear_corruption_levels_increase_toward_the_newest_frame():
    obj = PyramidFlowObjective(corruption="linear", text_dropout=0.0)
    latents = torch.zeros(1, 1, 6, 8, 8)  # zero frames: history = sigma * noise
    inp = obj.prepare(latents, 5, 0, _text(1), None, [torch.Generator().manual_seed(3)])
    # recover the per-frame level from the draw order (dropout, ratio, noise, then 2 uniforms)
    g = torch.Generator().manual_seed(3)
    torch.rand((), generator=g), torch.rand((), generator=g), torch.randn(1, 8, 8, generator=g)
    u = torch.rand((1, 2), generator=g)[0]
    hi, lo = float(u[0]) * ETA, float(u[1] * u[0]) * ETA
    levels = [lo + (hi - lo) * k / 4 for k in range(5)]
    for f in range(5):
        n = torch.randn(inp.history[f].shape, generator=g)
        torch.testing.assert_close(inp.history[f], levels[f] * n)
    assert levels == sorted(levels) and 0 <= levels[0] <= levels[-1] <= ETA


def test_batch_split_over_ranks_gives_the_same_examples():
    torch.manual_seed(1)
    latents = torch.randn(4, 2, 3, 8, 8)
    text = _text(4)
    null = HashTextEncoder(dim=8)([""])
    obj = PyramidFlowObjective(text_dropout=0.5)

    def gens(idx):
        return [torch.Generator().manual_seed(100 + i) for i in idx]

    full = obj.prepare(latents, 2, 2, text, null, gens(range(4)))
    halves = [
        obj.prepare(latents[a:b], 2, 2, TextEmbeddings(*(t[a:b] for t in text)), null, gens(range(a, b)))
        for a, b in ((0, 2), (2, 4))
    ]
    for name in ("noisy", "target", "sigma", "eps", "dropped"):
        torch.testing.assert_close(getattr(full, name), torch.cat([getattr(h, name) for h in halves]))
    for f in range(2):
        torch.testing.assert_close(full.history[f], torch.cat([h.history[f] for h in halves]))


def test_text_dropout_uses_the_null_text_and_keeps_the_rest():
    enc = HashTextEncoder(dim=6)
    text = enc(["a red circle moving up", "x", "a big blue square on a black background"])
    null = enc([""])
    assert null.token_states.shape[1] == 1  # the start token only
    out = apply_text_dropout(text, null, torch.tensor([True, False, True]))
    L = text.token_states.shape[1]
    assert out.token_states.shape == (3, L, 6)
    for i in (0, 2):
        torch.testing.assert_close(out.token_states[i, :1], null.token_states[0])
        assert out.token_states[i, 1:].abs().sum() == 0
        assert out.attention_mask[i].tolist() == [True] + [False] * (L - 1)
        torch.testing.assert_close(out.pooled[i], null.pooled[0])
    torch.testing.assert_close(out.token_states[1], text.token_states[1])
    assert out.attention_mask[1].tolist() == text.attention_mask[1].tolist()
    # a null text longer than the batch pads the whole batch
    long_null = pad_text(enc(["one two three four five six seven"]), 8)
    short = enc(["a", "b"])
    out = apply_text_dropout(short, long_null, torch.tensor([False, True]))
    assert out.token_states.shape[1] == 8 and out.attention_mask[0].sum() == 2
    # stack/unbatch round trip keeps only valid tokens
    parts = unbatch_text(text)
    assert [p[0].shape[0] for p in parts] == text.attention_mask.sum(1).tolist()
    again = stack_text(parts)
    torch.testing.assert_close(again.token_states, text.token_states * text.attention_mask[..., None])


class _Stub(torch.nn.Module):
    """Returns a fixed tensor and records what it was called with."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, **kw):
        self.calls.append(kw)
        return (self.out,)


def test_loss_is_the_velocity_mse_and_timestep_is_sigma_times_1000():
    torch.manual_seed(2)
    latents = torch.randn(2, 2, 3, 8, 8)
    obj = PyramidFlowObjective(text_dropout=0.0)
    inp = obj.prepare(latents, 1, 2, _text(2), None, [torch.Generator().manual_seed(i) for i in range(2)])
    pred = torch.randn_like(inp.target)
    model = _Stub(pred)
    out = obj.loss(model, inp)
    expect = ((pred.double() - inp.target.double()) ** 2).mean()
    assert abs(out.loss.item() - expect.item()) < 1e-6
    per = ((pred - inp.target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(out.per_sample, per)
    call = model.calls[0]
    torch.testing.assert_close(call["timestep"], inp.sigma * 1000)
    assert call["history"] is inp.history and call["hidden_states"] is inp.noisy


def test_bad_arguments():
    obj = PyramidFlowObjective()
    with pytest.raises(ValueError, match="frame_index"):
        obj.prepare(torch.zeros(1, 2, 2, 8, 8), 2, 0, _text(1), None, [torch.Generator()])
    with pytest.raises(ValueError, match="generators"):
        obj.prepare(torch.zeros(2, 2, 2, 8, 8), 0, 0, _text(2), None, [torch.Generator()])
    with pytest.raises(ValueError, match="null_text"):
        obj.prepare(torch.zeros(1, 2, 2, 8, 8), 0, 0, _text(1), None, [torch.Generator()])
    with pytest.raises(ValueError, match="corruption"):
        PyramidFlowObjective(corruption="quadratic")
