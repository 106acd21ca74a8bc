"""M4VWanTransformer (paper Sec. 4.1, 4.3): both layouts, MM-DiM pieces for Wan, save/load, errors, FLOPs rows."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_

from m4v.layers.temporal_branch import TemporalBranch
from m4v.layers.zigzag import zigzag_path
from m4v.models.wan import (
    M4VWanTransformer,
    WanMMDiMMixer,
    WanSequenceContext,
    WanTemporalBranch,
    build_mixer,
    wan_register_types,
)
from m4v.models.wan_configs import resolved_wan_config, wan_flops_rows, wan_named_config

C = 16


def tiny(**overrides):
    torch.manual_seed(0)
    return randomize_(M4VWanTransformer(**wan_named_config("wan-tiny", **overrides)))


def inputs(B=2, L=7, lengths=(7, 3), frames=3, h=4, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, frames, h, w, generator=g)
    txt = torch.randn(B, L, 384, generator=g)
    mask = torch.arange(L)[None] < torch.tensor(lengths[:B])[:, None]
    return dict(hidden_states=x, timestep=torch.tensor([700.0, 250.0][:B]), encoder_hidden_states=txt,
                encoder_attention_mask=mask)


VARIANTS = [dict(layout="attention"), dict(), dict(text_recomposition=False), dict(registers=False),
            dict(temporal_branch=False), dict(temporal_causal=False), dict(temporal_pool=2)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "mmdim")
def test_forward_backward(variant):
    model = tiny(**variant)
    kw = inputs()
    out = model(**kw).sample
    assert out.shape == kw["hidden_states"].shape and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.config.family == "wan"


@pytest.mark.parametrize("layout", ["mmdim", "attention"])
def test_batched_prompt_padding_does_not_change_outputs(layout):
    """A prompt gives the same velocity alone or next to a longer prompt (text stream left/right padding)."""
    model = tiny(layout=layout)
    kw = inputs(lengths=(7, 3))
    both = model(**kw).sample
    alone = model(kw["hidden_states"][1:], kw["timestep"][1:], kw["encoder_hidden_states"][1:, :3]).sample
    torch.testing.assert_close(both[1:], alone, atol=2e-5, rtol=1e-4)


def test_text_reaches_video_through_the_mmdim_mixer():
    """With cross-attention silenced, only the MM-DiM re-composition can carry the prompt to the video."""
    outs = {}
    for layout in ("attention", "mmdim"):
        model = tiny(layout=layout)
        with torch.no_grad():
            for b in model.blocks:
                b.cross_attn.to_out.weight.zero_()
                b.cross_attn.to_out.bias.zero_()
        kw = inputs(B=1)
        a = model(**kw).sample
        kw["encoder_hidden_states"] = kw["encoder_hidden_states"] + 1.0
        outs[layout] = (a - model(**kw).sample).abs().max().item()
    assert outs["attention"] == 0.0
    assert outs["mmdim"] > 1e-4


def test_temporal_branch_equals_base_branch_on_equal_frames():
    """Causal, pool 1: the Wan branch computes TemporalBranch's K_s = 1 case (history = earlier frames)."""
    torch.manual_seed(1)
    wan = WanTemporalBranch(32, 4, causal=True, pool=1)
    base = TemporalBranch(32, 4)
    base.load_state_dict(wan.state_dict())
    T, H, W = 4, 2, 3
    h = torch.randn(2, T * H * W, 32)
    torch.testing.assert_close(wan(h, (T, H, W)), base(h, [(H, W)] * T), atol=1e-6, rtol=1e-5)


def _reference_temporal(branch, h, grid, causal, pool):
    """Loop reference in float64: pool p x p blocks, per head attention over frames folded to width P*hd."""
    T, H, W = grid
    B, _, D = h.shape
    heads, hd = branch.num_heads, D // branch.num_heads
    x = h.double().reshape(B, T, H, W, D)
    hp, wp = H // pool, W // pool
    pooled = torch.zeros(B, T, hp, wp, D, dtype=torch.float64)
    for i in range(hp):
        for j in range(wp):
            pooled[:, :, i, j] = x[:, :, i * pool:(i + 1) * pool, j * pool:(j + 1) * pool].mean((2, 3))
    wq, wk, wv = branch.qkv.weight.double().chunk(3)
    bq, bk, bv = branch.qkv.bias.double().chunk(3)
    tok = pooled.reshape(B, T, hp * wp, D)
    q, k, v = tok @ wq.T + bq, tok @ wk.T + bk, tok @ wv.T + bv

    def rms(t, wgt):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * wgt.double()

    out = torch.zeros(B, T, hp * wp, D, dtype=torch.float64)
    for n in range(heads):
        sl = slice(n * hd, (n + 1) * hd)
        qh = rms(q[..., sl], branch.norm_q.weight).reshape(B, T, -1)
        kh = rms(k[..., sl], branch.norm_k.weight).reshape(B, T, -1)
        vh = v[..., sl].reshape(B, T, -1)
        for t in range(T):
            keys = range(t + 1) if causal else range(T)
            s = torch.stack([(qh[:, t] * kh[:, u]).sum(-1) for u in keys], -1) / math.sqrt(qh.shape[-1])
            a = torch.softmax(s, -1)
            o = sum(a[:, i : i + 1] * vh[:, u] for i, u in enumerate(keys))
            out[:, t, :, sl] = o.reshape(B, hp * wp, hd)
    out = out.reshape(B, T, hp, wp, D).repeat_interleave(pool, 2).repeat_interleave(pool, 3)
    return out.reshape(B, T * H * W, D)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pool", [1, 2])
def test_temporal_branch_against_loop_reference(causal, pool):
    torch.manual_seed(2)
    branch = WanTemporalBranch(16, 2, causal=causal, pool=pool).double()
    with torch.no_grad():
        branch.norm_q.weight.uniform_(0.5, 1.5)
        branch.norm_k.weight.uniform_(0.5, 1.5)
    grid = (3, 2, 4)
    h = torch.randn(2, 24, 16, dtype=torch.float64)
    torch.testing.assert_close(branch(h, grid), _reference_temporal(branch, h, grid, causal, pool))


@pytest.mark.parametrize("causal", [True, False])
def test_temporal_branch_causality(causal):
    torch.manual_seed(3)
    branch = WanTemporalBranch(16, 2, causal=causal)
    grid = (3, 2, 2)
    h = torch.randn(1, 12, 16)
    h2 = h.clone()
    h2[:, 8:] += 1.0  # change the last frame only
    diff = (branch(h, grid) - branch(h2, grid)).abs()[0, :8].max().item()
    assert (diff == 0.0) if causal else (diff > 1e-4)


def test_register_types_by_frame_position():
    assert wan_register_types(1) == [0]
    assert wan_register_types(2) == [0, 2]
    assert wan_register_types(5) == [0, 1, 1, 1, 2]


@pytest.mark.parametrize("path", range(8))
def test_recomposition_layout_and_inverse(path):
    """[Z_l, r, frame 0 zigzag, r, frame 1, r, frame 2, Z_r]: register types, scan order, exact inverse."""
    T, H, W, D = 3, 2, 4, 5
    mask = torch.tensor([[True, True, True], [True, False, False]])
    ctx = WanSequenceContext(mask, (T, H, W), head_dim=8)
    plan = ctx.plan(path)
    vis = torch.arange(T * H * W, dtype=torch.float64)[None, :, None].expand(2, -1, D) + 100
    regs = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)[:, None].expand(3, D)
    txt = torch.randn(2, 3, D, dtype=torch.float64)
    seq = plan.compose(txt, vis, regs)
    block = seq[0, 3 : 3 + T * (H * W + 1), 0]
    expect = []
    for f, typ in enumerate([0, 1, 2]):
        expect.append(-(typ + 1.0))
        expect += (zigzag_path(H, W, path) + f * H * W + 100).tolist()
    assert block.tolist() == expect
    y_txt, y_vis = plan.invert(seq)
    torch.testing.assert_close(y_vis, vis)
    torch.testing.assert_close(y_txt[0], 2 * txt[0])  # Z'_l + Z'_r
    torch.testing.assert_close(y_txt[1, 0], 2 * txt[1, 0])
    assert y_txt[1, 1:].abs().max() == 0


def test_zigzag_path_cycles_over_layers():
    cfg = resolved_wan_config("wan-tiny")
    paths = [build_mixer(cfg, i).path for i in range(10)]
    assert paths == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    assert isinstance(build_mixer(cfg, 0), WanMMDiMMixer)


def test_named_sizes_map_attention_to_mamba():
    with torch.device("meta"):
        m = M4VWanTransformer(**wan_named_config("wan-1.3b"))
    mamba = m.blocks[0].mixer.mamba
    assert (m.config.dim, m.config.num_heads, m.config.ffn_dim, m.config.num_layers) == (1536, 12, 8960, 30)
    assert (mamba.ngroups, mamba.d_state, mamba.d_inner, mamba.headdim) == (12, 128, 1536, 64)


@pytest.mark.parametrize("layout", ["mmdim", "attention"])
def test_save_load_round_trip(tmp_path, layout):
    model = tiny(layout=layout)
    kw = inputs()
    ref = model(**kw).sample
    model.save_pretrained(tmp_path)
    loaded = M4VWanTransformer.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    torch.testing.assert_close(loaded(**kw).sample, ref, atol=0, rtol=0)


def test_gradient_checkpointing_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny()
        if ckpt:
            model.enable_gradient_checkpointing()
        model(**inputs()).sample.square().mean().backward()
        grads.append(model.blocks[1].mixer.mamba.in_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


BAD = [
    ("family", dict(family="pyramidflow")),
    ("layout", dict(layout="full_temp")),
    ("patch_size", dict(patch_size=[1, 2])),
    ("dim", dict(dim=66)),
    ("num_heads", dict(dim=20, num_heads=5)),
    ("ffn_dim", dict(ffn_dim=0)),
    ("text_len", dict(text_len=-1)),
    ("freq_dim", dict(freq_dim=33)),
    ("eps", dict(eps=0.0)),
    ("temporal_pool", dict(temporal_pool=0)),
    ("ssm_headdim", dict(ssm_headdim=48)),
    ("ssm_ngroups", dict(ssm_ngroups=3)),
    ("ssm_expand", dict(ssm_expand=2)),
    ("registers", dict(registers="yes")),
]


@pytest.mark.parametrize("field,override", BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_the_field(field, override):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        M4VWanTransformer(**wan_named_config("wan-tiny", **override))


def test_bad_inputs_name_the_argument():
    model = tiny()
    kw = inputs()
    with pytest.raises(ValueError, match="^hidden_states:"):
        model(**dict(kw, hidden_states=torch.randn(2, 8, 3, 4, 8)))
    with pytest.raises(ValueError, match="^patch_size:"):
        model(**dict(kw, hidden_states=torch.randn(2, C, 3, 5, 8)))
    with pytest.raises(ValueError, match="^encoder_hidden_states:"):
        model(**dict(kw, encoder_hidden_states=torch.randn(2, 65, 384), encoder_attention_mask=None))
    with pytest.raises(ValueError, match="^encoder_hidden_states:"):
        model(**dict(kw, encoder_hidden_states=torch.randn(2, 7, 100)))
    with pytest.raises(ValueError, match="^encoder_attention_mask:"):
        model(**dict(kw, encoder_attention_mask=torch.ones(2, 6, dtype=torch.bool)))
    with pytest.raises(ValueError, match="^temporal_pool:"):
        tiny(temporal_pool=3)(**kw)


def test_flops_rows_against_hand_count_and_diffusers_parameters():
    from diffusers import WanTransformer3DModel

    rows = {(r["model"], r["layout"]): r for r in wan_flops_rows(480, 832, 81)}
    n, d = 21 * 30 * 52, 1536
    assert rows["wan-1.3b", "attention"]["video_tokens"] == n
    hand = 30 * (8 * n * d * d + 4 * n * n * d) / 1e12
    assert rows["wan-1.3b", "attention"]["mixer_tflops"] == pytest.approx(hand, rel=1e-12)
    cross = 30 * (4 * n * d * d + 4 * 512 * d * d + 4 * n * 512 * d) / 1e12
    for layout in ("attention", "mmdim"):
        assert rows["wan-1.3b", layout]["cross_attention_tflops"] == pytest.approx(cross, rel=1e-12)
    for name in ("wan-1.3b", "wan-14b"):
        assert rows[name, "mmdim"]["mixer_tflops"] < rows[name, "attention"]["mixer_tflops"]
    sizes = {"wan-1.3b": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30), "wan-14b": {}}
    for name, kw in sizes.items():
        with torch.device("meta"):
            wan = WanTransformer3DModel(**kw)
        assert rows[name, "attention"]["params_b"] * 1e9 == pytest.approx(sum(p.numel() for p in wan.parameters()))
    big = {(r["model"], r["layout"]): r for r in wan_flops_rows(720, 1280, 81, models=("wan-14b",))}
    assert big["wan-14b", "attention"]["video_tokens"] == 21 * 45 * 80
    with pytest.raises(ValueError, match="^num_frames:"):
        wan_flops_rows(480, 832, 80)


def test_mixer_flops_of_mmdim_match_a_hand_count():
    """MM-DiM layer: in_proj, conv, SSD, out_proj over [prompt, registers, video, prompt] + temporal branch."""
    row = wan_flops_rows(480, 832, 81, models=("wan-1.3b",), layouts=("mmdim",), prompt_len=100)[0]
    T, H, W = 21, 30, 52
    n, d, heads, dstate = T * H * W, 1536, 24, 128
    seq = n + 200 + T
    in_proj = 2 * seq * d * (2 * d + 2 * 12 * dstate + heads)
    conv = 2 * seq * (d + 2 * 12 * dstate) * 4
    layer = in_proj + conv + 4 * seq * d * dstate + 2 * seq * d * d
    temporal = 6 * n * d * d + 4 * T * T * H * W * d
    assert row["mixer_tflops"] == pytest.approx(30 * (layer + temporal) / 1e12, rel=1e-12)


def test_layer_norm_in_float32_for_bf16_weights():
    model = tiny().to(torch.bfloat16)
    out = model(**inputs()).sample
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert F.mse_loss(out, tiny()(**inputs()).sample).item() < 1e-2
