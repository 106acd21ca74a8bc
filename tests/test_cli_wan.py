"""The CLI picks the Wan2.1 family from the model directory (issue: M4V (Wan2.1)); `m4v flops --family wan`."""

import json

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

from m4v.cli import main
from m4v.io.video import probe_video
from m4v.models import M4VWanTransformer, wan_named_config
from m4v.models.text_encoders import MiniLMTextEncoder
from m4v.pipelines import M4VWanPipeline


def test_generate_picks_the_wan_family(tmp_path, capsys):
    torch.manual_seed(0)
    pipe = M4VWanPipeline(
        M4VWanTransformer(**wan_named_config("wan-tiny")),
        AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
        MiniLMTextEncoder(),
        FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    pipe.save_pretrained(tmp_path / "wan")
    out = tmp_path / "wan.mp4"
    args = ["generate", "a cat", "-o", str(out), "--model", str(tmp_path / "wan"), "--steps", "2",
            "--height", "32", "--width", "64", "--frames", "9"]
    assert main(args) == 0
    info = probe_video(out)
    assert (info.num_frames, info.height, info.width) == (9, 32, 64)
    assert main([*args, "--video-guidance", "3"]) == 2
    assert "not used by the Wan2.1 family" in capsys.readouterr().err
    assert main([*args, "--sqg-start-frame", "1"]) == 2
    assert "--sqg-start-frame: not used by the Wan2.1 family" in capsys.readouterr().err


def test_flops_family_wan(capsys):
    assert main(["flops", "--family", "wan", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    sizes = {(r["model"], r["layout"], r["height"]) for r in rows}
    assert ("wan-1.3b", "attention", 480) in sizes and ("wan-1.3b", "mmdim", 720) in sizes
    for r in rows:
        if r["layout"] == "mmdim":
            att = next(a for a in rows if a["layout"] == "attention" and a["model"] == r["model"]
                       and a["height"] == r["height"])
            assert r["mixer_tflops"] < att["mixer_tflops"]
