"""M4VWanPipeline and wan_flow_matching_loss (paper Sec. 4.1): whole-video flow matching, CFG, save/load, UMT5."""

import json

import numpy as np
import pytest
import torch
from conftest import randomize_
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

from m4v.models.text_encoders import MiniLMTextEncoder
from m4v.models.wan import M4VWanTransformer
from m4v.models.wan_configs import wan_named_config
from m4v.pipelines.pipeline_wan import (
    M4VWanPipeline,
    UMT5TextEncoder,
    is_wan_model_dir,
    load_wan_text_encoder,
    shift_sigma,
    wan_default_shift,
    wan_flow_matching_loss,
)


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)


def tiny_transformer(**kw):
    torch.manual_seed(0)
    return randomize_(M4VWanTransformer(**wan_named_config("wan-tiny", **kw)))


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder()


@pytest.fixture()
def pipe(minilm):
    p = M4VWanPipeline(tiny_transformer(), tiny_vae(), minilm, FlowMatchEulerDiscreteScheduler(shift=5.0))
    p.set_progress_bar_config(disable=True)
    return p


KW = dict(height=32, width=64, num_frames=9, num_inference_steps=2)


def test_generates_whole_video_deterministically(pipe):
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = pipe("a red ball", generator=gen(0), **KW)
    assert a.frames.shape == (1, 9, 32, 64, 3) and a.latents.shape == (1, 16, 3, 4, 8)
    assert np.isfinite(a.frames).all() and a.frames.min() >= 0 and a.frames.max() <= 1
    b = pipe("a red ball", generator=gen(0), **KW)
    np.testing.assert_array_equal(a.frames, b.frames)
    c = pipe("a red ball", generator=gen(1), **KW)
    assert np.abs(a.frames - c.frames).max() > 0
    pt = pipe(["a", "b"], generator=gen(0), output_type="pt", **KW).frames
    assert pt.shape == (2, 3, 9, 32, 64)


def test_euler_sampler_with_exact_velocity_lands_on_the_guided_target(pipe):
    """Straight-line flow: with v = (x - c) / sigma, Euler steps are exact, so the output is c = c_u + s (c_c - c_u)."""
    g = torch.Generator().manual_seed(3)
    c_u, c_c = torch.randn(1, 16, 3, 4, 8, generator=g), torch.randn(1, 16, 3, 4, 8, generator=g)
    seen = []

    def exact(x, t, states, mask):
        sigma = (t / 1000.0).view(-1, 1, 1, 1, 1)
        seen.append(float(t[0]))
        target = torch.cat([c_u, c_c]) if x.shape[0] == 2 else c_c
        return type("Out", (), {"sample": (x - target) / sigma})()

    pipe.transformer.forward = exact
    steps, scale = 6, 4.0
    out = pipe("x", generator=torch.Generator().manual_seed(0), guidance_scale=scale, output_type="latent",
               **dict(KW, num_inference_steps=steps))
    torch.testing.assert_close(out.latents, c_u + scale * (c_c - c_u), atol=1e-4, rtol=1e-4)
    s = np.linspace(1, 0, steps + 1)[:steps]
    shift = wan_default_shift(32, 64)
    np.testing.assert_allclose(seen, 1000 * shift * s / (1 + (shift - 1) * s), rtol=1e-5)
    seen.clear()
    pipe("x", guidance_scale=1.0, output_type="latent", shift=2.0, **dict(KW, num_inference_steps=steps))
    np.testing.assert_allclose(seen, 1000 * shift_sigma(s, 2.0), rtol=1e-5)


def test_callback_sees_every_step(pipe):
    calls = []
    pipe("a cat", callback=lambda n, st, i, x: calls.append((n, st, i, tuple(x.shape))), output_type="latent",
         **dict(KW, num_inference_steps=3))
    assert calls == [(0, 0, i, (1, 16, 3, 4, 8)) for i in range(3)]


def test_default_shift_per_resolution():
    assert wan_default_shift(480, 832) == 3.0 and wan_default_shift(832, 480) == 3.0
    assert wan_default_shift(720, 1280) == 5.0


def test_save_load_round_trip(pipe, tmp_path, minilm):
    pipe.default_size, pipe.default_frames = (32, 64), 9
    ref = pipe("a dog", generator=torch.Generator().manual_seed(0), num_inference_steps=2).frames
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "M4VWanPipeline" and index["family"] == "wan" and index["text_encoder"] == "minilm"
    assert is_wan_model_dir(tmp_path)
    loaded = M4VWanPipeline.from_pretrained(tmp_path, text_encoder=minilm)
    loaded.set_progress_bar_config(disable=True)
    out = loaded("a dog", generator=torch.Generator().manual_seed(0), num_inference_steps=2).frames
    np.testing.assert_array_equal(out, ref)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "M4VPipeline"}))
    assert not is_wan_model_dir(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        M4VWanPipeline.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("kw,field", [
    (dict(num_frames=8), "num_frames"),
    (dict(height=40), "height"),
    (dict(width=24), "width"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(shift=0.0), "shift"),
    (dict(output_type="gif"), "output_type"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    (dict(latents=torch.zeros(1, 16, 2, 4, 8)), "latents"),
])
def test_bad_arguments_name_the_field(pipe, kw, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        pipe("a cat", **dict(KW, **kw))
    with pytest.raises(ValueError, match="^prompt:"):
        pipe("  ", **KW)


def test_mismatched_text_encoder_is_refused(minilm):
    with pytest.raises(ValueError, match="^text_encoder:"):
        M4VWanPipeline(tiny_transformer(text_dim=32), tiny_vae(), minilm, FlowMatchEulerDiscreteScheduler())


def test_training_step_matches_a_manual_rectified_flow_loss():
    model = tiny_transformer()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 3, 4, 8, generator=g)
    states, mask = torch.randn(2, 5, 384, generator=g), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()
    loss = wan_flow_matching_loss(model, x0, (states, mask), torch.Generator().manual_seed(7), shift=3.0)
    # independent recomputation with the same draws: u first, then the noise
    g2 = torch.Generator().manual_seed(7)
    u = torch.rand(2, generator=g2)
    noise = torch.randn(x0.shape, generator=g2)
    sigma = 3.0 * u / (1 + 2.0 * u)
    xt = (1 - sigma.view(2, 1, 1, 1, 1)) * x0 + sigma.view(2, 1, 1, 1, 1) * noise
    with torch.no_grad():
        pred = model(xt, sigma * 1000, states, mask).sample
    assert loss.item() == pytest.approx(((pred - (noise - x0)) ** 2).mean().item(), rel=1e-5)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.step()
    after = wan_flow_matching_loss(model, x0, (states, mask), torch.Generator().manual_seed(7), shift=3.0)
    assert torch.isfinite(after) and after.item() < loss.item()


def test_training_step_text_dropout_and_errors():
    model = tiny_transformer()
    x0 = torch.randn(1, 16, 3, 4, 8)
    states, mask = torch.randn(1, 4, 384), torch.ones(1, 4, dtype=torch.bool)
    dropped = wan_flow_matching_loss(model, x0, (states, mask), torch.Generator().manual_seed(1), text_drop_prob=1.0)
    empty = wan_flow_matching_loss(model, x0, (states, torch.zeros_like(mask)), torch.Generator().manual_seed(1))
    assert dropped.item() == pytest.approx(empty.item(), rel=1e-6)
    with pytest.raises(ValueError, match="^latents:"):
        wan_flow_matching_loss(model, x0[0], (states, mask))
    with pytest.raises(ValueError, match="^text_drop_prob:"):
        wan_flow_matching_loss(model, x0, (states, mask), text_drop_prob=2.0)


@pytest.fixture(scope="module")
def tiny_umt5(tmp_path_factory, minilm):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("umt5")
    cfg = UMT5Config(vocab_size=len(minilm.tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                     relative_attention_num_buckets=8)
    UMT5EncoderModel(cfg).save_pretrained(d)
    minilm.tokenizer.save_pretrained(d / "tok")
    return d


def test_umt5_text_encoder_and_pipeline(tiny_umt5, tmp_path):
    from transformers import UMT5EncoderModel

    enc = load_wan_text_encoder({"umt5": ".", "tokenizer": "tok", "max_length": 16}, root=str(tiny_umt5))
    assert isinstance(enc, UMT5TextEncoder) and enc.token_dim == 32
    emb = enc(["a cat on a mat", "dog"])
    ref_model = UMT5EncoderModel.from_pretrained(tiny_umt5)
    tok = enc.tokenizer(["a cat on a mat", "dog"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(**tok).last_hidden_state
    torch.testing.assert_close(emb.token_states, ref)
    assert emb.attention_mask.tolist() == tok["attention_mask"].bool().tolist()
    p = M4VWanPipeline(tiny_transformer(text_dim=32), tiny_vae(), enc, FlowMatchEulerDiscreteScheduler())
    p.set_progress_bar_config(disable=True)
    ref_frames = p("a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **KW).frames
    p.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "model_index.json").read_text())["text_encoder"]
    assert spec["umt5"] == str(tiny_umt5) and spec["max_length"] == 16
    loaded = M4VWanPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    out = loaded("a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **KW).frames
    torch.testing.assert_close(out, ref_frames, atol=0, rtol=0)
