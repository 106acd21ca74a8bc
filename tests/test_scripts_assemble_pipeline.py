"""scripts/assemble_pipeline.py: the shipped-model assembly (issue 6) writes a loadable pipeline whose configs carry
no path of the build machine and whose weights are float16 with --half."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import load_script, tiny_model
from safetensors.torch import load_file

from m4v.models.vae import build_video_vae
from m4v.pipelines import M4VPipeline


def _script():
    return load_script("scripts/assemble_pipeline.py")


def test_assembled_pipeline_loads_without_source_paths(tmp_path: Path) -> None:
    transformer, vae = tiny_model(), build_video_vae("tiny")
    transformer.save_pretrained(tmp_path / "ema")
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "pipe"
    _script().main(["--transformer", str(tmp_path / "ema"), "--vae", str(tmp_path / "vae"), "-o", str(out),
                    "--guidance", "3", "2", "--size", "64", "--frames", "9", "--half"])

    configs = sorted(out.rglob("config.json"))
    assert {p.parent.name for p in configs} >= {"transformer", "vae"}
    for path in configs:  # from_pretrained records the folder it read; the shipped files must not carry it
        assert "_name_or_path" not in json.loads(path.read_text()), path
    assert json.loads((out / "model_index.json").read_text())["default_guidance"] == [3.0, 2.0]
    weights = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}

    pipe = M4VPipeline.from_pretrained(out)
    assert pipe.default_guidance == (3.0, 2.0) and pipe.default_frames == 9
    ref = transformer.state_dict()
    for name, value in pipe.transformer.state_dict().items():  # float32 parameters upcast from the float16 files
        torch.testing.assert_close(value, ref[name].half().float(), rtol=0, atol=0)
