"""M4VTransformer (paper Sec. 3.2-3.3): every layout and Table 3 switch, fusion, causality, save/load, errors."""

import pytest
import torch
from conftest import randomize_, tiny_model

from m4v.models import LAYOUTS, M4VTransformer, named_config

C = 16


def inputs(B=2, L=7, lengths=(7, 3), seed=0, cur=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(B, L, 384, generator=g, dtype=dtype)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    pooled = torch.randn(B, 384, generator=g, dtype=dtype)
    # pyramid history at three resolutions (1/4, 1/2, full) as at the last stage
    q, h = cur // 4, cur // 2
    hist = [torch.randn(B, C, q, q, generator=g, dtype=dtype) for _ in range(2)]
    hist += [torch.randn(B, C, h, h, generator=g, dtype=dtype), torch.randn(B, C, cur, cur, generator=g, dtype=dtype)]
    x = torch.randn(B, C, cur, cur, generator=g, dtype=dtype)
    t = torch.tensor([700.0, 250.0][:B])
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=txt, pooled_projections=pooled,
                encoder_attention_mask=mask, history=hist)


SWITCHES = [dict(), dict(text_recomposition=False), dict(registers=False), dict(temporal_branch=False),
            dict(text_recomposition=False, registers=False, temporal_branch=False)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_backward_every_layout(layout):
    model = tiny_model(layout=layout)
    kw = inputs()
    kw["hidden_states"].requires_grad_(True)
    out = model(**kw).sample
    assert out.shape == kw["hidden_states"].shape and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert kw["hidden_states"].grad.abs().sum() > 0


@pytest.mark.parametrize("switches", SWITCHES)
def test_forward_backward_table3_switches(switches):
    model = tiny_model(layout="full_temp", **switches)
    out = model(**inputs()).sample
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    has_temporal = any(getattr(b, "temporal", None) is not None for b in model.single_blocks)
    assert has_temporal == switches.get("temporal_branch", True)


@pytest.mark.parametrize("layout", ["full_temp", "full", "full_attn", "parallel"])
def test_batch_padding_does_not_change_outputs(layout):
    """A prompt gives the same velocity alone or batched with a longer prompt (text of different lengths)."""
    model = tiny_model(layout=layout).double()
    kw = inputs(lengths=(7, 3), dtype=torch.float64)
    both = model(**kw).sample
    alone = {k: (v[1:2, :3] if k == "encoder_hidden_states" else v[1:2, :3] if k == "encoder_attention_mask"
                 else [h[1:2] for h in v] if k == "history" else v[1:2]) for k, v in kw.items()}
    single = model(**alone).sample
    assert torch.allclose(both[1:2], single, atol=1e-10)


def _text_output_probe(model, kw):
    """Text stream output of the single-stream blocks (what the next layer would read)."""
    captured = {}

    def hook(_m, _inp, out):
        captured["x"] = out

    handle = model.single_blocks[-1].register_forward_hook(hook)
    model(**kw)
    handle.remove()
    return captured["x"]


def test_bidirectional_fusion_in_mm_dim():
    """Early text token -> visual outputs, and late visual token -> text outputs, within MM-DiM blocks only."""
    model = tiny_model(layout="full", num_dual_layers=0).double()
    kw = inputs(dtype=torch.float64)
    L = kw["encoder_hidden_states"].shape[1]
    base_vis, base_x = model(**kw).sample, _text_output_probe(model, kw)
    k2 = dict(kw, encoder_hidden_states=kw["encoder_hidden_states"].clone())
    k2["encoder_hidden_states"][:, 0] += 1.0  # an early text token
    assert not torch.allclose(model(**k2).sample, base_vis, atol=1e-8)
    k3 = dict(kw, hidden_states=kw["hidden_states"].clone())
    k3["hidden_states"][:, :, -2:, -2:] += 1.0  # the last visual tokens of the current frame
    x3 = _text_output_probe(model, k3)
    valid = kw["encoder_attention_mask"]
    assert (x3[:, :L] - base_x[:, :L])[valid].abs().max() > 1e-6, "late visual tokens must reach the text"
    # without text re-composition the text comes first and a causal scan cannot see later video
    flat = tiny_model(layout="full", num_dual_layers=0, text_recomposition=False).double()
    a, b = _text_output_probe(flat, kw), _text_output_probe(flat, k3)
    assert torch.allclose(a[:, :L], b[:, :L], atol=1e-12)


def test_attention_baseline_is_temporally_causal():
    """In the attention layouts, history frames never see the current frame (temporal-causal mask)."""
    model = tiny_model(layout="full_attn").double()
    kw = inputs(dtype=torch.float64)
    base = _text_output_probe(model, kw)
    k2 = dict(kw, hidden_states=kw["hidden_states"] + 1.0)
    out = _text_output_probe(model, k2)
    n_cur = (16 // 2) ** 2
    assert torch.allclose(out[:, :-n_cur], base[:, :-n_cur], atol=1e-12)
    assert not torch.allclose(out[:, -n_cur:], base[:, -n_cur:])


def test_save_pretrained_roundtrip(tmp_path):
    model = tiny_model(layout="full_temp")
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").exists()
    loaded = M4VTransformer.from_pretrained(tmp_path / "m")
    kw = inputs()
    with torch.no_grad():
        assert torch.equal(model(**kw).sample, loaded(**kw).sample)


def test_first_frame_without_history_and_stages():
    model = tiny_model()
    kw = inputs()
    for cur in (4, 8, 16):
        out = model(**dict(kw, hidden_states=torch.randn(2, C, cur, cur), history=[])).sample
        assert out.shape == (2, C, cur, cur)


@pytest.mark.parametrize(
    "override,field",
    [(dict(width=65), "width"), (dict(layout="sideways"), "layout"), (dict(axes_dims_rope=[8, 8, 8]), "axes_dims_rope"),
     (dict(ssm_headdim=24), "ssm_headdim"), (dict(ssm_expand=2), "ssm_expand"), (dict(num_heads=0), "num_heads")],
)
def test_bad_configs_name_the_field(override, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        M4VTransformer(**named_config("tiny", **override))


def test_patch_not_dividing_latent():
    model = tiny_model()
    kw = inputs()
    with pytest.raises(ValueError, match="patch_size"):
        model(**dict(kw, hidden_states=torch.randn(2, C, 15, 16), history=[]))
    with pytest.raises(ValueError, match="history"):
        model(**dict(kw, history=[torch.randn(2, C + 1, 4, 4)]))


def test_gradient_checkpointing_same_gradients():
    model = tiny_model()
    kw = inputs()
    model(**kw).sample.square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(**kw).sample.square().mean().backward()
    for a, p in zip(ref, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_randomize_helper_changes_zero_init():
    m = M4VTransformer(**named_config("tiny"))
    assert m.proj_out.weight.abs().sum() == 0
    randomize_(m)
    assert m.proj_out.weight.abs().sum() > 0


@pytest.mark.parametrize("layout", ["full_temp", "full_attn"])
def test_torch_compile_matches_eager(layout):
    """torch.compile(model) (dynamo + AOT autograd, no code generation: the CPU-portable part of compilation)
    gives the eager outputs and gradients, with the pyramid history and text padding."""
    import torch._dynamo

    torch._dynamo.reset()
    model = tiny_model(layout=layout)
    kw = inputs()
    out = model(**kw).sample
    out.square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    got = compiled(**kw).sample
    got.square().mean().backward()
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


def test_from_pretrained_is_strict(tmp_path):
    """A folder missing some weights, holding another class, or not there at all is a ValueError, not a
    silently random-initialised model (diffusers' default) nor a download attempt."""
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    loaded = M4VTransformer.from_pretrained(tmp_path / "m")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), loaded.parameters()))
    path = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    dropped = sorted(k for k in sd if k.startswith("single_blocks.0."))
    save_file({k: v for k, v in sd.items() if k not in dropped}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{len(dropped)} missing"):
        M4VTransformer.from_pretrained(tmp_path / "m")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKLLTXVideo"}')
    with pytest.raises(ValueError, match="holds a VAE"):
        M4VTransformer.from_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="does not exist"):
        M4VTransformer.from_pretrained(tmp_path / "nope")
