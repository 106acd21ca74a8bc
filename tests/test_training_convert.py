"""Attention -> Mamba initialisation (paper D.2, Mamba-in-the-Llama): every copied slice, fresh parts, training."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from m4v.models import M4VTransformer, named_config
from m4v.models.layouts import block_mixers
from m4v.training.convert import convert_attention_model, mamba_slices
from m4v.training.testing import tiny_config
from m4v.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _attention_model(seed: int = 1) -> M4VTransformer:
    torch.manual_seed(seed)
    model = M4VTransformer(**named_config("tiny", layout="full_attn"))
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised tensor, so every copy is visible
            p.normal_(0.0, 0.05)
    return model


def _fresh(layout: str, seed: int) -> M4VTransformer:
    torch.manual_seed(seed)
    return M4VTransformer(**named_config("tiny", layout=layout))


@pytest.mark.parametrize(
    "layout, swap, fold", [("full_temp", False, True), ("interleaved", True, True), ("parallel", False, False)]
)
def test_every_slice(layout, swap, fold):
    src = _attention_model()
    dst, report = convert_attention_model(src, layout, swap_qk=swap, seed=7, fold_qk_norm=fold)
    fresh = _fresh(layout, 7)
    s_sd, d_sd, f_sd = src.state_dict(), dst.state_dict(), fresh.state_dict()
    for k, v in d_sd.items():
        if not k.startswith("single_blocks."):
            assert torch.equal(v, s_sd[k]), k  # dual blocks, embedders, output layers
    D = src.config.width
    for i, mixer in enumerate(block_mixers(layout, src.config.num_single_layers)):
        pre = f"single_blocks.{i}."
        if mixer == "attention":
            for k, v in src.single_blocks[i].state_dict().items():
                assert torch.equal(d_sd[pre + k], v)
            continue
        for part in ("ada", "mlp"):
            for k, v in getattr(src.single_blocks[i], part).state_dict().items():
                assert torch.equal(d_sd[f"{pre}{part}.{k}"], v)
        wq, wk, wv = s_sd[pre + "qkv.weight"].split(D)
        H, hd = src.config.num_heads, D // src.config.num_heads
        if fold:  # q/k RMSNorm gains (shared by the heads) scale each head's rows
            gq, gk = s_sd[pre + "qk_norm.norm_q.weight"], s_sd[pre + "qk_norm.norm_k.weight"]
            wq = torch.cat([wq[h * hd : (h + 1) * hd] * gq[:, None] for h in range(H)])
            wk = torch.cat([wk[h * hd : (h + 1) * hd] * gk[:, None] for h in range(H)])
        mamba = dst.single_blocks[i].mamba
        sl = mamba_slices(mamba)
        w = d_sd[pre + "mamba.in_proj.weight"]
        assert torch.equal(w[sl["x"]], wv)
        assert torch.equal(w[sl["B"]], wq if swap else wk)
        assert torch.equal(w[sl["C"]], wk if swap else wq)
        assert torch.equal(d_sd[pre + "mamba.out_proj.weight"], s_sd[pre + "out.weight"])
        # one SSM group per head: group g of B holds the key rows of head g
        for g in range(H):
            rows = w[sl["B"]][g * mamba.d_state : (g + 1) * mamba.d_state]
            assert torch.equal(rows, (wq if swap else wk)[g * hd : (g + 1) * hd])
        # freshly initialised parts are exactly those of a new model with the same seed
        f_w = f_sd[pre + "mamba.in_proj.weight"]
        assert torch.equal(w[sl["z"]], f_w[sl["z"]]) and torch.equal(w[sl["dt"]], f_w[sl["dt"]])
        for k in ("conv_weight", "conv_bias", "dt_bias", "A_log", "D", "norm.weight"):
            assert torch.equal(d_sd[f"{pre}mamba.{k}"], f_sd[f"{pre}mamba.{k}"]), k
        assert torch.equal(d_sd[pre + "registers"], f_sd[pre + "registers"])
        if layout == "full_temp":
            assert torch.equal(d_sd[pre + "temporal.qkv.weight"], f_sd[pre + "temporal.qkv.weight"])
        if mixer == "parallel":
            assert torch.equal(d_sd[pre + "qkv.weight"], s_sd[pre + "qkv.weight"])
            assert torch.equal(d_sd[pre + "qkv.bias"], s_sd[pre + "qkv.bias"])
        else:
            assert pre + "qkv.bias" in report.dropped and pre + "qkv.bias" not in d_sd
            assert (pre + "qk_norm.norm_q.weight" in report.dropped) == (not fold)
    assert report.copied and report.from_attention and report.fresh


def test_errors_are_clear():
    src = _attention_model()
    with pytest.raises(ValueError, match="d_state 16 != head dim 32"):
        convert_attention_model(src, "full_temp", overrides={"ssm_d_state": 16})
    with pytest.raises(ValueError, match="ngroups 1 != num_heads 2"):
        convert_attention_model(src, "full", overrides={"ssm_ngroups": 1})
    with pytest.raises(ValueError, match="unknown layout"):
        convert_attention_model(src, "mamba_everywhere")
    mamba_model = M4VTransformer(**named_config("tiny", layout="full"))
    with pytest.raises(ValueError, match="give a full_attn checkpoint"):
        convert_attention_model(mamba_model, "full_temp")




def test_cli_convert_then_train(tmp_path, capsys):
    src = _attention_model()
    src.save_pretrained(tmp_path / "attn")
    assert run_cli(["convert", "--from-attention", str(tmp_path / "attn"), "-o", str(tmp_path / "m4v"),
                 "--layout", "full_temp"]) == 0
    assert "freshly initialised" in capsys.readouterr().out
    converted = M4VTransformer.from_pretrained(tmp_path / "m4v")
    assert converted.config.layout == "full_temp"
    ref, _ = convert_attention_model(src, "full_temp", seed=0)
    for (k, a), b in zip(converted.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    # the converted model trains: finite losses, lower held-out loss after a few steps
    stage = dict(steps=12, height=64, width=64, num_frames=9, image_ratio=0.0, batch_size=2)
    cfg = tiny_config(tmp_path / "run", stages=[stage], model={"pretrained": str(tmp_path / "m4v")},
                      data={"source": "moving_shapes", "moving_shapes": {"num_samples": 2}},
                      objective={"text_dropout": 0.0}, optim={"lr": 2e-3})
    trainer = Trainer(cfg)
    assert torch.equal(dict(trainer.model.named_parameters())["single_blocks.0.mamba.out_proj.weight"],
                       src.single_blocks[0].out.weight)
    held = [0, 1, 2, 3]
    before = trainer.evaluate(held)
    history = trainer.train()
    after = trainer.evaluate(held)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert after < 0.7 * before, (before, after)
