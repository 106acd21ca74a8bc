"""``m4v train`` / ``train-vae`` / ``prepare`` / ``convert`` on bad input and at their ends: one-line errors (exit 2),
nothing half-written, a diverged run stopped, and a final/ folder that ``m4v generate --model`` loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from m4v.cli import main
from m4v.training.checkpoint import checkpoint_path
from m4v.training.testing import tiny_config, tiny_config_dict
from m4v.training.trainer import Trainer

STAGE = [dict(steps=1, height=64, width=64, num_frames=9, batch_size=2)]


def exit_code(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit code of ``m4v argv``, its stderr); the error must be one line without a traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def write_config(tmp_path: Path, out: Path, **sections) -> str:  # noqa: ANN003
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(out, **sections)))
    return str(path)


def test_diverged_run_stops_with_one_line_and_saves_nothing(tmp_path, capsys):
    """A loss that turns NaN / inf ends the run: exit 2, no checkpoint or final/ written for the diverged steps."""
    out = tmp_path / "run"
    stages = [dict(steps=8, height=64, width=64, num_frames=1, batch_size=2)]
    cfg = write_config(tmp_path, out, stages=stages, optim={"lr": 1e6, "grad_clip": 0.0},
                       checkpoint={"every": 1000, "export_final": True, "resume": "none"})  # fmt: skip
    code, err = exit_code(["train", "--config", cfg], capsys)
    assert code == 2 and "training diverged: the loss is" in err and len(err.strip().splitlines()) == 1
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


def test_resume_none_refuses_an_output_dir_with_checkpoints(tmp_path):
    """--resume none over an old run would have its checkpoints pruned against the old ones and resumed later."""
    old = checkpoint_path(tmp_path, 20)
    old.mkdir(parents=True)
    (old / "meta.json").write_text(json.dumps({"step": 20}))
    with pytest.raises(ValueError, match="already holds checkpoints of another run"):
        Trainer(tiny_config(tmp_path, stages=STAGE))


@pytest.mark.parametrize("meta, message", [("garbage", r"is damaged \(not readable JSON"), ("{}", "has no step count")])
def test_damaged_checkpoint_meta_is_named(tmp_path, meta, message):
    ckpt = checkpoint_path(tmp_path, 3)
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(meta)
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_config(tmp_path, stages=STAGE, checkpoint={"resume": "auto"}))


def test_output_dir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    for out in (blocker, blocker / "sub"):
        code, err = exit_code(["train", "--config", write_config(tmp_path, out)], capsys)
        assert code == 2 and "output_dir:" in err and "is a file" in err
    assert blocker.read_text() == ""


def test_final_folder_is_a_pipeline_that_generate_loads(tmp_path, capsys):
    """final/ holds model_index.json, vae/ and scheduler/ beside the trained transformer/ (MiniLM, tiny VAE)."""
    from m4v.pipelines import M4VPipeline

    out = tmp_path / "run"
    cfg = write_config(tmp_path, out, stages=STAGE, text_encoder="minilm",
                       checkpoint={"every": 1000, "export_final": True, "resume": "none"})  # fmt: skip
    assert main(["train", "--config", cfg]) == 0
    assert f"step 1 of 1: weights in {out / 'final'}" in capsys.readouterr().out
    index = json.loads((out / "final" / "model_index.json").read_text())
    assert index["text_encoder"] == "minilm" and index["default_size"] == [64, 64] and index["default_frames"] == 9
    pipe = M4VPipeline.from_pretrained(out / "final")
    from safetensors.torch import load_file

    saved = load_file(str(out / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    for name, p in pipe.transformer.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name
    video = pipe("a red circle", num_frames=1, height=64, width=64, num_inference_steps=1, output_type="pt").frames
    assert video.shape[-2:] == (64, 64) and torch.isfinite(video).all()


def test_convert_bad_output_and_inputs(tmp_path, capsys):
    from m4v.models import M4VTransformer, named_config

    src = tmp_path / "attn"
    M4VTransformer(**named_config("tiny", layout="full_attn")).save_pretrained(src)
    blocker = tmp_path / "afile"
    blocker.write_text("")
    code, err = exit_code(["convert", "--from-attention", str(src), "-o", str(blocker)], capsys)
    assert code == 2 and "exists and is a file" in err and blocker.read_text() == ""
    out = str(tmp_path / "c")
    code, err = exit_code(["convert", "--from-attention", str(src), "-o", out, "--set", "foo=3"], capsys)
    assert code == 2 and "--set: unknown key 'foo'" in err and not (tmp_path / "c").exists()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((src / "config.json").read_text())
    code, err = exit_code(["convert", "--from-attention", str(tmp_path / "noweights"), "-o", str(tmp_path / "c")],
                          capsys)  # fmt: skip
    assert code == 2 and "has a config.json but no weights" in err
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLLTXVideo"}))
    code, err = exit_code(["convert", "--from-attention", str(vae), "-o", str(tmp_path / "c")], capsys)
    assert code == 2 and "holds a VAE (AutoencoderKLLTXVideo), not an M4V transformer" in err
    for flags, says in ((["--dtype", "int8"], "--dtype: only used with --from-wan"),
                        (["--vae", "/nonexistent"], "--vae: only used with --from-wan"),
                        (["--seed", str(2**70)], "--seed: must be between 0"), (["--seed", "-1"], "--seed:")):
        code, err = exit_code(["convert", "--from-attention", str(src), "-o", out, *flags], capsys)
        assert code == 2 and says in err and not (tmp_path / "c").exists(), flags
    assert main(["convert", "--from-attention", str(src), "-o", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "diffusion_pytorch_model.safetensors").is_file()


def test_unknown_model_override_is_named(tmp_path):
    with pytest.raises(ValueError, match="model.overrides: unknown key 'widthh'; M4VTransformer takes"):
        Trainer(tiny_config(tmp_path, stages=STAGE, model={"overrides": {"widthh": 3}}))


def test_prepare_leaves_nothing_behind_on_failure(tmp_path, capsys, monkeypatch):
    """An empty source, a bad geometry or an interrupted run: exit 2 / 130 and no output folder."""
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--height", "64", "--width", "64", "--num-frames", "9", "--text-encoder", '{"hash": {"dim": 384}}']
    code, err = exit_code(["prepare", "--data", str(empty), "--out", str(tmp_path / "p1"), *args], capsys)
    assert code == 2 and "has no usable item" in err and not (tmp_path / "p1").exists()
    code, err = exit_code(["prepare", "--data", "moving_shapes", "--out", str(tmp_path / "p2"), "--height", "50",
                           "--width", "64", "--num-frames", "9"], capsys)  # fmt: skip
    assert code == 2 and "multiples of 8" in err and not (tmp_path / "p2").exists()
    from m4v.training import shards

    def interrupted(*a, **k):  # noqa: ANN002, ANN003, ANN202
        (Path(a[2]) / "64x64x9").mkdir(parents=True, exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "prepare_geometry", interrupted)
    code, err = exit_code(["prepare", "--data", "moving_shapes", "--out", str(tmp_path / "p3"), *args], capsys)
    assert code == 130 and not (tmp_path / "p3").exists()
    # --set overrides --config values: without a config it would be ignored silently, so it is refused
    code, err = exit_code(["prepare", "--data", "moving_shapes", "--out", str(tmp_path / "p4"), *args, "--set",
                           "data.moving_shapes.num_samples=4"], capsys)  # fmt: skip
    assert code == 2 and "--set" in err and "--config" in err and not (tmp_path / "p4").exists()


def test_prepare_refuses_to_mix_encoders(tmp_path, capsys):
    out = str(tmp_path / "p")
    common = ["prepare", "--data", "moving_shapes", "--out", out, "--width", "64", "--num-frames", "1", "--set",
              "data.moving_shapes.num_samples=2", "--config", write_config(tmp_path, tmp_path / "run")]  # fmt: skip
    assert main([*common, "--height", "64", "--text-encoder", '{"hash": {"dim": 384}}']) == 0
    capsys.readouterr()
    code, err = exit_code([*common, "--height", "128", "--text-encoder", '{"hash": {"dim": 128}}'], capsys)
    assert code == 2 and "cannot be mixed" in err and not (tmp_path / "p" / "128x64x1").exists()
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    assert index["text_encoder"] == {"hash": {"dim": 384}} and list(index["geometries"]) == ["64x64x1"]


def test_train_vae_names_a_transformer_config(tmp_path, capsys):
    code, err = exit_code(["train-vae", "--config", write_config(tmp_path, tmp_path / "run")], capsys)
    assert code == 2 and "it is an 'm4v train' config" in err


def test_damaged_checkpoint_shards_name_the_previous_checkpoint(tmp_path):
    """A truncated DCP shard in the latest checkpoint is reported as damaged (not as a model mismatch), with the
    run's previous complete checkpoint to resume from."""
    stages = [dict(steps=2, height=64, width=64, num_frames=1, batch_size=2)]
    Trainer(tiny_config(tmp_path, stages=stages, checkpoint={"every": 1, "keep": 2})).train()
    latest = checkpoint_path(tmp_path, 2)
    shard = next(latest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError) as e:
        Trainer(tiny_config(tmp_path, stages=stages, checkpoint={"resume": "auto"}))
    assert "is damaged" in str(e.value) and f"--resume {checkpoint_path(tmp_path, 1)}" in str(e.value)
