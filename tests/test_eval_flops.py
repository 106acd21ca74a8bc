"""`m4v flops` against the paper's Table 4 (reference-facts section 2)."""

import json

from m4v.cli import main
from m4v.eval.flops import attention_flops, generation_flops, last_step_frame_grids, mamba_flops, resolved_config


def test_token_counts_of_the_last_step():
    g121 = last_step_frame_grids(768, 1280, 121)
    g241 = last_step_frame_grids(768, 1280, 241)
    assert sum(h * w for h, w in g121) == 11760 and len(g121) == 16
    assert sum(h * w for h, w in g241) == 15360 and len(g241) == 31
    assert g121[-1] == (48, 80) and g121[0] == (12, 20) and g121[-3] == (24, 40)


def test_hand_counts():
    # 8 N D^2 + 4 N^2 D, multiply-add = 2
    assert attention_flops(10, 4) == 8 * 10 * 16 + 4 * 100 * 4
    cfg = dict(ssm_expand=1, ssm_headdim=2, ssm_ngroups=None, ssm_d_state=3, ssm_d_conv=4)
    # d=4: heads 2, groups 2, in_proj 4 -> 2*4 + 2*2*3 + 2 = 22, conv_dim 4 + 12 = 16
    assert mamba_flops(5, 4, cfg) == 2 * 5 * 4 * 22 + 2 * 5 * 16 * 4 + 4 * 5 * 4 * 3 + 2 * 5 * 4 * 4


def test_generation_flops_by_hand():
    """tiny full_attn (D 64, MLP 256, 2 dual + 4 single blocks), 64x64x9: two latent frames of 4x4 tokens, 8 text
    tokens. Sequence lengths per (frame, stage) from the pyramid history rule, written out."""
    cfg = resolved_config("tiny", layout="full_attn")
    D = 64
    # frame 0 (2 steps per stage): 1, 4, 16 video tokens; frame 1 (1 step): history 1/4 -> 1+1, 1/2 -> 4+4, full 16+16
    lengths = [(8 + 1, 2), (8 + 4, 2), (8 + 16, 2), (8 + 2, 1), (8 + 8, 1), (8 + 32, 1)]
    attn = sum(k * (8 * n * D * D + 4 * n * n * D) for n, k in lengths)
    mlp = sum(k * 2 * 2 * n * D * 4 * D for n, k in lengths)
    got = generation_flops(cfg, 64, 64, 9, steps=(2, 1), text_len=8)
    assert (got.dual_attention, got.single_mixers, got.mlp) == (2 * attn, 4 * attn, 6 * mlp)
    floor = generation_flops(cfg, 64, 64, 9, steps=(2, 1), text_len=8, mixers=False)
    assert floor.total == 2 * attn + 6 * mlp


def test_flops_json_matches_paper(capsys):
    assert main(["flops", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["layout"]: r for r in data["rows"]}
    assert set(rows) == {"full_attn", "full", "full_temp", "post_half", "pre_half", "interleaved", "parallel"}
    fa = rows["full_attn"]["tflops"]
    assert abs(fa["121"] / 33.84 - 1) < 0.03 and abs(fa["241"] / 55.44 - 1) < 0.03
    for layout, paper in (("full_attn", 1.97), ("full", 2.04), ("full_temp", 2.21)):
        assert abs(rows[layout]["params_b"] / paper - 1) < 0.05
    for layout in ("full", "full_temp", "post_half"):
        assert rows[layout]["tflops"]["241"] < fa["241"]
    assert any("Mamba layouts" in n for n in data["notes"])


def test_flops_table_and_bad_layout(capsys):
    assert main(["flops", "--layouts", "full", "full_attn"]) == 0
    out = capsys.readouterr().out
    assert "full_attn" in out and "notes:" in out
    assert main(["flops", "--layouts", "nope"]) == 2
    assert "unknown layout" in capsys.readouterr().err
