"""convert_from_wan (paper Sec. 4.1, D.2): Wan2.1 (diffusers layout) -> M4VWanTransformer, both layouts, CLI."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from m4v.layers.mamba2 import softplus_inverse
from m4v.models.wan import M4VWanTransformer
from m4v.pipelines.pipeline_wan import M4VWanPipeline
from m4v.training.convert import mamba_slices
from m4v.training.convert_wan import (
    add_wan_convert_arguments,
    cli_convert_from_wan,
    convert_from_wan,
    load_wan_state_dict,
    map_wan_key,
    register_convert_wan,
)

HEADS, HD, LAYERS = 4, 16, 3


@pytest.fixture(scope="module")
def wan_dirs(tmp_path_factory):
    """A tiny random Wan2.1 transformer (text_dim 384 = MiniLM) saved whole and sharded, plus a tiny Wan VAE."""
    torch.manual_seed(0)
    wan = WanTransformer3DModel(num_attention_heads=HEADS, attention_head_dim=HD, ffn_dim=96, num_layers=LAYERS,
                                text_dim=384, freq_dim=32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in wan.parameters():  # non-trivial norms, biases and tables
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    root = tmp_path_factory.mktemp("wan")
    wan.save_pretrained(root / "single")
    wan.save_pretrained(root / "sharded", max_shard_size="100KB")
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).save_pretrained(root / "vae")
    return wan.eval(), root


def test_sharded_checkpoint_is_read_whole(wan_dirs):
    wan, root = wan_dirs
    assert (root / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    sharded, single = load_wan_state_dict(str(root / "sharded")), load_wan_state_dict(str(root / "single"))
    assert sharded.keys() == single.keys() == wan.state_dict().keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def test_attention_layout_reproduces_wan(wan_dirs, tmp_path):
    """Copied exactly, the attention layout computes what WanTransformer3DModel computes (zero-padded 512 text)."""
    wan, root = wan_dirs
    convert_from_wan(root / "sharded", tmp_path, layout="attention")
    model = M4VWanTransformer.from_pretrained(tmp_path / "transformer")
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 16, 3, 4, 6, generator=g), torch.tensor([900.0, 35.0])
    states = torch.randn(2, 7, 384, generator=g)
    mask = torch.arange(7)[None] < torch.tensor([7, 4])[:, None]
    padded = torch.zeros(2, 512, 384)
    padded[:, :7] = states * mask[..., None]
    with torch.no_grad():
        ref = wan(x, t, padded).sample
        out = model(x, t, states, mask).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("swap_qk", [False, True])
def test_mmdim_mapping(wan_dirs, tmp_path, swap_qk):
    wan, root = wan_dirs
    report = convert_from_wan(root / "single", tmp_path, swap_qk=swap_qk, seed=3)
    model = M4VWanTransformer.from_pretrained(tmp_path / "transformer")
    src, dst = wan.state_dict(), model.state_dict()
    # everything but attn1 is copied, each to the name the rules give
    copied = dict(report.copied)
    assert set(copied) == {k for k in src if ".attn1." not in k}
    for s, d in copied.items():
        assert d == map_wan_key(s) and torch.equal(dst[d], src[s]), s
    assert copied["condition_embedder.text_embedder.linear_1.weight"] == "text_embedder.fc1.weight"
    assert copied["blocks.2.attn2.to_out.0.bias"] == "blocks.2.cross_attn.to_out.bias"
    assert copied["blocks.0.ffn.net.2.weight"] == "blocks.0.ffn.fc2.weight"
    for i, block in enumerate(model.blocks):
        a = {k.split(f"blocks.{i}.attn1.")[1]: v for k, v in src.items() if k.startswith(f"blocks.{i}.attn1.")}
        mamba = block.mixer.mamba
        s = mamba_slices(mamba)
        w = mamba.in_proj.weight
        q = a["to_q.weight"] * a["norm_q.weight"][:, None]
        k = a["to_k.weight"] * a["norm_k.weight"][:, None]
        torch.testing.assert_close(w[s["x"]], a["to_v.weight"], atol=0, rtol=0)
        torch.testing.assert_close(w[s["B"]], q if swap_qk else k, atol=0, rtol=0)
        torch.testing.assert_close(w[s["C"]], k if swap_qk else q, atol=0, rtol=0)
        torch.testing.assert_close(mamba.out_proj.weight, a["to_out.0.weight"], atol=0, rtol=0)
        torch.testing.assert_close(block.mixer.out_bias,
                                   a["to_out.0.bias"] + a["to_out.0.weight"] @ a["to_v.bias"])
        # one group per head, d_state = head dim
        assert (mamba.ngroups, mamba.d_state, mamba.d_inner) == (HEADS, HD, HEADS * HD)
        # the rest: Mamba2's init recipe
        for p in block.mixer.parameters():
            assert torch.isfinite(p).all()
        A = torch.exp(mamba.A_log)
        assert ((A >= 1 - 1e-5) & (A <= 16 + 1e-4)).all()
        assert torch.equal(mamba.D, torch.ones_like(mamba.D))
        dt = torch.nn.functional.softplus(mamba.dt_bias)
        assert ((dt >= 1e-3 * (1 - 1e-4)) & (dt <= 0.1 * (1 + 1e-4))).all()
        torch.testing.assert_close(softplus_inverse(dt), mamba.dt_bias, atol=1e-5, rtol=1e-5)
        bound = 1 / math.sqrt(HEADS * HD)  # nn.Linear's default init on in_proj (fan_in = width)
        assert 0 < w[s["z"]].abs().max() <= bound + 1e-6 and 0 < w[s["dt"]].abs().max() <= bound + 1e-6
        assert mamba.conv_weight.abs().max() <= 0.5 + 1e-6 and torch.equal(mamba.norm.weight,
                                                                           torch.ones_like(mamba.norm.weight))
        assert block.mixer.registers.abs().max() > 0 and block.mixer.temporal is not None
    assert len(report.from_attention) == 3 * LAYERS and "blocks.0.attn1.to_q.bias" in report.dropped
    out = model(torch.randn(1, 16, 3, 4, 6), torch.tensor([500.0]), torch.randn(1, 5, 384)).sample
    assert torch.isfinite(out).all()


def test_no_fold_and_seed(wan_dirs, tmp_path):
    wan, root = wan_dirs
    convert_from_wan(root / "single", tmp_path / "a", fold_qk_norm=False, seed=5)
    convert_from_wan(root / "sharded", tmp_path / "b", fold_qk_norm=False, seed=5)
    a = M4VWanTransformer.from_pretrained(tmp_path / "a" / "transformer").state_dict()
    b = M4VWanTransformer.from_pretrained(tmp_path / "b" / "transformer").state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # sharded == single, same seed -> same fresh weights
    m = M4VWanTransformer.from_pretrained(tmp_path / "a" / "transformer")
    s = mamba_slices(m.blocks[1].mixer.mamba)
    assert torch.equal(m.blocks[1].mixer.mamba.in_proj.weight[s["C"]], wan.state_dict()["blocks.1.attn1.to_q.weight"])


def test_converted_model_generates_end_to_end(wan_dirs, tmp_path):
    wan, root = wan_dirs
    convert_from_wan(root / "sharded", tmp_path, vae_dir=root / "vae", text_encoder="minilm",
                     overrides={"text_len": 64}, default_size=(32, 48), default_frames=9)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["text_encoder"] == "minilm" and (tmp_path / "vae" / "config.json").is_file()
    pipe = M4VWanPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red ball bouncing", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.frames.shape == (1, 9, 32, 48, 3) and np.isfinite(out.frames).all()
    assert pipe.transformer.config.layout == "mmdim"


def test_cli_hooks(wan_dirs, tmp_path):
    wan, root = wan_dirs
    parser = argparse.ArgumentParser(prog="m4v")
    sub = parser.add_subparsers(dest="command")
    register_convert_wan(sub)
    args = parser.parse_args(["convert-wan", "--from-wan", str(root / "single"), "-o", str(tmp_path / "a"),
                              "--layout", "attention", "--dtype", "bfloat16"])
    assert args.func(args) == 0
    m = M4VWanTransformer.from_pretrained(tmp_path / "a" / "transformer")
    assert m.config.layout == "attention"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # the lead's existing `convert` parser: -o, --layout (default full_temp), --swap-qk, --seed, --set already there
    conv = argparse.ArgumentParser()
    conv.add_argument("-o", "--output")
    conv.add_argument("--layout", default="full_temp")
    conv.add_argument("--swap-qk", action="store_true")
    conv.add_argument("--seed", type=int, default=0)
    conv.add_argument("--set", action="append")
    conv.add_argument("--no-fold-qk-norm", action="store_true")
    add_wan_convert_arguments(conv)
    args = conv.parse_args(["--from-wan", str(root / "single"), "-o", str(tmp_path / "b"), "--swap-qk"])
    assert cli_convert_from_wan(args) == 0
    assert M4VWanTransformer.from_pretrained(tmp_path / "b" / "transformer").config.layout == "mmdim"


def test_m4v_convert_from_wan_command(wan_dirs, tmp_path, capsys):
    from m4v.cli import main

    wan, root = wan_dirs
    assert main(["convert", "--from-wan", str(root / "single"), "-o", str(tmp_path / "c")]) == 0
    assert M4VWanTransformer.from_pretrained(tmp_path / "c" / "transformer").config.layout == "mmdim"
    assert main(["convert", "-o", str(tmp_path / "d")]) == 2
    assert "exactly one of" in capsys.readouterr().err
    for flags, says in ((["--set", "bogus=1"], "--set: unknown key 'bogus'; M4VWanTransformer takes"),
                        (["--tokenizer", "/nonexistent"], "--tokenizer: only used with --text-encoder")):
        assert main(["convert", "--from-wan", str(root / "single"), "-o", str(tmp_path / "e"), *flags]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and not (tmp_path / "e").exists(), flags


def test_errors_name_the_problem(wan_dirs, tmp_path):
    wan, root = wan_dirs
    with pytest.raises(ValueError, match="^--from-wan:"):
        convert_from_wan(tmp_path, tmp_path / "o")
    with pytest.raises(ValueError, match="^--layout:"):
        convert_from_wan(root / "single", tmp_path / "o", layout="full_temp")
    with pytest.raises(ValueError, match="^--text-encoder:"):
        convert_from_wan(root / "single", tmp_path / "o", vae_dir=root / "vae")
    i2v = tmp_path / "i2v"
    i2v.mkdir()
    cfg = json.loads((root / "single" / "config.json").read_text())
    (i2v / "config.json").write_text(json.dumps(dict(cfg, image_dim=1280)))
    with pytest.raises(ValueError, match="^image_dim:"):
        convert_from_wan(i2v, tmp_path / "o")
    (i2v / "config.json").write_text(json.dumps(dict(cfg, num_layers=LAYERS + 1)))
    (i2v / "diffusion_pytorch_model.safetensors").write_bytes((root / "single" / "diffusion_pytorch_model.safetensors")
                                                               .read_bytes())
    with pytest.raises(ValueError, match="does not match its config.json"):
        convert_from_wan(i2v, tmp_path / "o")
    with pytest.raises(ValueError, match="^--from-wan: parameter"):
        map_wan_key("condition_embedder.image_embedder.ff.net.0.proj.weight")
