"""Training config schema, learning-rate schedule, optimizer groups and the deterministic step planner (D.1)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from m4v.training.config import TrainConfig, from_dict, load_config, parse_override, validate
from m4v.training.data import Planner
from m4v.training.objective import choose_frame, choose_stage
from m4v.training.optim import build_optimizer, learning_rate, no_decay_names
from m4v.training.testing import tiny_config_dict


def _cfg(tmp_path, **sections):
    return validate(from_dict(TrainConfig, tiny_config_dict(tmp_path, **sections), ""))


def test_yaml_round_trip_and_overrides(tmp_path):
    d = tiny_config_dict(tmp_path / "run")
    d["optim"] = {"lr": "1e-4", "warmup_steps": 3}  # YAML 1.1 reads 1e-4 as a string
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    cfg = load_config(path, {"stages.0.batch_size": 4, "objective.corruption": "constant"})
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.stages[0].batch_size == 4
    assert cfg.objective.corruption == "constant"
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.objective.stage_weights == [1.0, 2.0, 1.0]
    assert cfg.objective.text_dropout == pytest.approx(0.1)
    assert parse_override("optim.lr=2e-5") == ("optim.lr", "2e-5")
    assert parse_override("train.compile=true") == ("train.compile", True)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"optim": {"lr": 1e-3, "typo": 1}}, "optim: unknown key 'typo'"),
        ({"optim": {"lr": "fast"}}, "optim.lr: must be a number"),
        ({"stages": [{"steps": 2, "height": 96, "width": 64}]}, "stages[0].height: must be a positive multiple of 64"),
        ({"stages": [{"steps": 2, "height": 64, "width": 64, "num_frames": 10}]}, "stages[0].num_frames"),
        ({"stages": [{"steps": 2, "height": 64, "width": 64, "num_frames": 1, "image_ratio": 0.5}]}, "image_ratio"),
        ({"stages": [{"steps": 2, "height": 64, "width": 64, "reward": True}]}, "no 'reward' section"),
        ({"stages": [{"height": 64, "width": 64}]}, "stages[0].steps: missing required key"),
        ({"objective": {"corruption": "cubic"}}, "objective.corruption"),
        ({"objective": {"stage_weights": [1, 2]}}, "objective.stage_weights"),
        ({"train": {"precision": "fp8"}}, "train.precision"),
        ({"train": {"grad_accum": True}}, "train.grad_accum: must be an integer"),
        ({"stages": []}, "stages: give at least one"),
        ({"optim": {"lr": 0}}, "optim.lr: must be positive"),
        ({"optim": {"lr": float("inf")}}, "optim.lr: must be a finite number"),
        ({"optim": {"lr": float("nan")}}, "optim.lr: must be a finite number"),
        ({"stages": [{"steps": 2, "height": 64, "width": 64, "lr": 0.0}]}, "stages[0].lr: must be positive"),
        ({"ema": {"start_step": -5}}, "ema.start_step: must be >= 0"),
        ({"model": {"config": "tiny", "overrides": {"patch_size": 1}},
          "stages": [{"steps": 2, "height": 80, "width": 64}]},
         "multiple of 32 (8x VAE, two pyramid halvings, patch 1"),
        ({"zzz": 1}, "unknown top-level key 'zzz'"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, patch, message):
    d = tiny_config_dict(tmp_path)
    d.update(patch)
    with pytest.raises(ValueError) as e:
        validate(from_dict(TrainConfig, d, ""))
    assert message in str(e.value)


def test_stage_sizes_follow_the_model_patch_size(tmp_path):
    """Pixel sizes: multiples of 8 (VAE) x 4 (two pyramid halvings) x patch; a patch-1 model (the shipped one)
    takes 96, a patch-2 one does not. The patch size of model.pretrained comes from its config.json."""
    stage = [{"steps": 2, "height": 96, "width": 96}]
    assert _cfg(tmp_path, model={"config": "tiny", "overrides": {"patch_size": 1}}, stages=stage).stages[0].height == 96
    folder = tmp_path / "pre"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "M4VTransformer", "patch_size": 1}')
    assert _cfg(tmp_path, model={"pretrained": str(folder)}, stages=stage).stages[0].width == 96
    with pytest.raises(ValueError, match="multiple of 64"):
        _cfg(tmp_path, stages=stage)


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("seed: [\n", {}, "is not valid YAML (line 2"),
        (None, {"stages.5.steps": 2}, "--set stages.5.steps: stages.5 is not an item of a list of 1"),
        (None, {"stages.x.steps": 2}, "stages.x is not an item"),
        (None, {"seed.x": 1}, "--set seed.x: seed is a single value (0)"),
        (None, {"optim..lr": 1}, "is not a dotted key"),
    ],
)
def test_bad_yaml_and_overrides_are_one_line_errors(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(tiny_config_dict(tmp_path / "run")))
    with pytest.raises(ValueError) as e:
        load_config(path, overrides)
    assert message in str(e.value)
    with pytest.raises(ValueError, match="is a folder"):
        load_config(tmp_path)
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_override("optim.lr=[")


def test_override_into_a_null_section(tmp_path):
    """``reward:`` left empty in the YAML is null; --set reward.weight=... fills it instead of failing."""
    d = tiny_config_dict(tmp_path / "run")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d) + "reward:\n")
    cfg = load_config(path, {"reward.clip_dir": str(tmp_path), "reward.weight": 0.5})
    assert cfg.reward is not None and cfg.reward.weight == 0.5


def test_learning_rate_warmup_constant_and_cosine(tmp_path):
    stages = [
        {"steps": 10, "height": 64, "width": 64, "num_frames": 1, "image_ratio": 1.0},
        {"steps": 20, "height": 64, "width": 64, "num_frames": 9, "lr": 5e-4, "warmup_steps": 4},
    ]
    cfg = _cfg(tmp_path, stages=stages, optim={"lr": 1e-3, "warmup_steps": 5, "schedule": "constant"})
    assert [learning_rate(cfg, s) for s in range(6)] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 1e-3])
    assert learning_rate(cfg, 10) == pytest.approx(5e-4 / 4)
    assert learning_rate(cfg, 29) == pytest.approx(5e-4)
    cos = {"lr": 1e-3, "warmup_steps": 0, "schedule": "cosine", "min_lr_ratio": 0.1}
    cfg = _cfg(tmp_path, stages=stages, optim=cos)
    for s in range(10):  # stage 0: 10 steps, no warm-up; cosine from 1 to 0.1
        expect = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 10)))
        assert learning_rate(cfg, s) == pytest.approx(expect)
    assert learning_rate(cfg, 10 + 4 + 8) == pytest.approx(5e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 16))))


def test_no_weight_decay_groups(tmp_path):
    from m4v.models import M4VTransformer, named_config

    model = M4VTransformer(**named_config("tiny"))
    exempt = no_decay_names(model)
    flagged = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert flagged and flagged <= exempt
    assert any(n.endswith("A_log") for n in flagged) and any(n.endswith("dt_bias") for n in flagged)
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim < 2 or n in flagged for n in exempt)
    assert "single_blocks.0.mlp.fc1.weight" not in exempt
    cfg = _cfg(tmp_path, optim={"lr": 1e-3, "weight_decay": 0.1})
    opt = build_optimizer(model, cfg)
    decay, plain = opt.param_groups
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    ids = {id(p) for p in plain["params"]}
    named = dict(model.named_parameters())
    assert ids == {id(named[n]) for n in exempt}
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_choose_stage_and_frame():
    w = [1, 2, 1]
    assert [choose_stage(u, w) for u in (0.0, 0.24, 0.25, 0.74, 0.75, 0.999)] == [0, 0, 1, 1, 2, 2]
    assert choose_frame(0.0, 16) == 0 and choose_frame(0.999, 16) == 15
    assert {choose_frame(u / 100, 16, window=8) for u in range(100)} == set(range(8, 16))
    assert choose_frame(0.5, 3, window=8) == 1


def _pools(n_img, n_vid):
    return lambda index: (list(range(100, 100 + n_img)), list(range(n_vid)))


def test_planner_is_rank_independent_and_mixes_as_configured(tmp_path):
    stages = [{"steps": 400, "height": 64, "width": 64, "num_frames": 17, "image_ratio": 0.25, "batch_size": 4}]
    cfg = _cfg(tmp_path, stages=stages)
    one = Planner(cfg, _pools(5, 7), world_size=1)
    two = Planner(cfg, _pools(5, 7), world_size=2)
    plans = [one.plan(s) for s in range(400)]
    assert plans == [two.plan(s) for s in range(400)]  # the same schedule on every rank
    # a rank's slice: rank r takes items [r*B/world, (r+1)*B/world)
    p = plans[0]
    assert p.local_items(0, 2) + p.local_items(1, 2) == p.items
    assert p.sample_keys(1, 2) == [(0, 2), (0, 3)]
    kinds = Counter(p.kind for p in plans)
    assert 0.18 < kinds["image"] / 400 < 0.32
    stages_seen = Counter(p.pyramid_stage for p in plans)
    assert abs(stages_seen[1] / 400 - 0.5) < 0.08 and abs(stages_seen[0] / 400 - 0.25) < 0.07
    assert all(p.frame_index == 0 and p.num_latent_frames == 1 for p in plans if p.kind == "image")
    assert {p.frame_index for p in plans if p.kind == "video"} == {0, 1, 2}
    # epochs: consecutive draws of one kind visit every item once per epoch
    videos = [i for p in plans if p.kind == "video" for i in p.items]
    for e in range(len(videos) // 7):
        assert sorted(videos[7 * e : 7 * e + 7]) == list(range(7))
    images = [i for p in plans if p.kind == "image" for i in p.items]
    assert sorted(images[:5]) == list(range(100, 105))


def test_planner_rejects_batch_not_divisible_by_ranks(tmp_path):
    cfg = _cfg(tmp_path, stages=[{"steps": 2, "height": 64, "width": 64, "num_frames": 9, "batch_size": 3}])
    with pytest.raises(ValueError, match="divisible by the 2 ranks"):
        Planner(cfg, _pools(1, 1), world_size=2)


def test_progressive_stage_lookup(tmp_path):
    stages = [
        {"steps": 3, "height": 64, "width": 64, "num_frames": 1, "image_ratio": 1.0, "name": "t2i"},
        {"steps": 2, "height": 128, "width": 64, "num_frames": 17, "image_ratio": 0.1, "name": "t2v"},
    ]
    cfg = _cfg(tmp_path, stages=stages, train={"grad_accum": 2})
    assert cfg.total_steps == 5
    assert [cfg.stage_at(s) for s in range(5)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    planner = Planner(cfg, _pools(2, 2))
    plans = [planner.plan(m) for m in range(10)]
    assert [p.step for p in plans] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [p.stage_index for p in plans] == [0] * 6 + [1] * 4
    assert all(p.kind == "image" for p in plans[:6])
    with pytest.raises(ValueError, match="past the end"):
        cfg.stage_at(5)


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    from m4v.models import M4VTransformer, named_config
    from m4v.training.vae_training import load_vae_config

    if path.name.startswith("vae_"):
        cfg = load_vae_config(path)
        assert cfg.total_steps > 0
        return
    cfg = load_config(path)
    assert cfg.total_steps > 0
    if cfg.model.pretrained is None:  # the model config builds (on the meta device: no memory)
        with torch.device("meta"):
            if cfg.model.family == "wan":
                from m4v.models import M4VWanTransformer, wan_named_config

                M4VWanTransformer(**wan_named_config(cfg.model.config, **cfg.model.overrides))
            else:
                M4VTransformer(**named_config(cfg.model.config, **cfg.model.overrides))
