"""Training the M4V (Wan2.1) family (paper Sec. 4.1): whole-video flow matching, resume, export, config errors."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from m4v.models.text_encoders import MiniLMTextEncoder
from m4v.models.wan import M4VWanTransformer
from m4v.models.wan_configs import wan_named_config
from m4v.pipelines.pipeline_wan import M4VWanPipeline, wan_flow_matching_loss
from m4v.training.config import TrainConfig, from_dict, validate
from m4v.training.metrics import read_metrics
from m4v.training.text import HashTextEncoder, encode_null
from m4v.training.trainer import Trainer
from m4v.training.wan_objective import WanFlowObjective, load_wan_vae

ROOT = Path(__file__).parent.parent
CONFIG = ROOT / "configs" / "train_wan_tiny.yaml"
STAGES = [
    dict(steps=2, height=32, width=32, num_frames=1, batch_size=2, name="t2i"),
    dict(steps=2, height=32, width=32, num_frames=9, image_ratio=0.0, batch_size=2, name="t2v"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder()


def wan_config_dict(output_dir, **sections) -> dict:
    """configs/train_wan_tiny.yaml, made smaller: 32x32, 8 clips, no progress bar, no TensorBoard."""
    d = yaml.safe_load(CONFIG.read_text())
    d.update(output_dir=str(output_dir), stages=copy.deepcopy(STAGES))
    d["data"]["moving_shapes"]["num_samples"] = 8
    d["logging"] = {"every": 1, "progress": False, "tensorboard": False}
    d["checkpoint"] = {"every": 1000, "export_final": False, "resume": "none"}
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return d


def wan_config(output_dir, **sections) -> TrainConfig:
    return validate(from_dict(TrainConfig, wan_config_dict(output_dir, **sections), ""))


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _tiny_model(seed: int = 0) -> M4VWanTransformer:
    torch.manual_seed(seed)
    model = M4VWanTransformer(**wan_named_config("wan-tiny"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from the zero-initialised output so the loss depends on the input
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


# ------------------------------------------------------------------------------------------ objective
def test_objective_is_wan_flow_matching_loss_per_sample():
    """Each sample with its own generator = wan_flow_matching_loss on that sample alone (Sec. 4.1 loss)."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 3, 4, 4, generator=g)
    states = torch.randn(2, 5, 384, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    pooled = states.mean(1)
    from m4v.models.text_encoders import TextEmbeddings

    text = TextEmbeddings(states, mask, pooled)
    seeds = [11, 12]
    obj = WanFlowObjective(text_dropout=0.0, text_len=64)
    inputs = obj.prepare(x0, text, None, [torch.Generator().manual_seed(s) for s in seeds], shift=3.0)
    out = obj.loss(model, inputs)
    refs = [
        wan_flow_matching_loss(model, x0[j : j + 1], (states[j : j + 1], mask[j : j + 1]),
                               torch.Generator().manual_seed(s), shift=3.0)
        for j, s in enumerate(seeds)
    ]
    for j, ref in enumerate(refs):
        assert out.per_sample[j].item() == pytest.approx(ref.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((refs[0].item() + refs[1].item()) / 2, rel=1e-5)
    # the draws in float64 by hand: u, then the noise; sigma = shift u / (1 + (shift - 1) u)
    g2 = torch.Generator().manual_seed(seeds[1])
    u = torch.rand(1, generator=g2).double()
    noise = torch.randn(1, 16, 3, 4, 4, generator=g2).double()
    sigma = 3.0 * u / (1 + 2.0 * u)
    tol = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inputs.sigma[1].double(), sigma[0], **tol)
    torch.testing.assert_close(inputs.noisy[1:].double(), (1 - sigma) * x0[1:].double() + sigma * noise, **tol)
    torch.testing.assert_close(inputs.target[1:].double(), noise - x0[1:].double(), **tol)
    # splitting the batch (as over ranks) gives the same examples
    half = obj.prepare(x0[1:], TextEmbeddings(states[1:], mask[1:], pooled[1:]), None,
                       [torch.Generator().manual_seed(seeds[1])], shift=3.0)
    assert torch.equal(half.noisy[0], inputs.noisy[1]) and torch.equal(half.sigma[0], inputs.sigma[1])


def test_text_dropout_uses_the_null_text_and_text_len():
    enc = HashTextEncoder(dim=384)
    text, null = enc(["a red circle moving left", "a square"]), encode_null(enc)
    x0 = torch.zeros(2, 16, 1, 2, 2)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    all_drop = WanFlowObjective(text_dropout=1.0).prepare(x0, text, null, gens, shift=5.0)
    assert all_drop.dropped.all()
    L = null.token_states.shape[1]
    for j in range(2):
        torch.testing.assert_close(all_drop.text.token_states[j, :L], null.token_states[0])
        assert all_drop.text.attention_mask[j].sum() == L
    keep = WanFlowObjective(text_dropout=0.0, text_len=3).prepare(x0, text, null, gens, shift=5.0)
    assert not keep.dropped.any() and keep.text.token_states.shape[1] == 3
    torch.testing.assert_close(keep.text.token_states, text.token_states[:, :3])


def test_wan_vae_latents_match_the_pipeline(minilm):
    """The trainer's Wan latents are M4VWanPipeline.encode_video's (normalised by latents_mean / latents_std)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    vae = load_wan_vae("wan-tiny", seed=0)
    assert vae.temporal_compression == 4 and vae.latent_channels == 16
    assert not any(p.requires_grad for p in vae.parameters())
    pipe = M4VWanPipeline(_tiny_model(), vae.model, minilm, FlowMatchEulerDiscreteScheduler())
    video = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (2, 16, 2, 4, 4)
    torch.testing.assert_close(z, pipe.encode_video(video))
    cfg = vae.model.config
    raw = vae.model.encode(video).latent_dist.mode()
    mean, std = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1), torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std)


# --------------------------------------------------------------------------------------------- trainer
def test_cli_trains_the_shipped_config_and_exports_a_pipeline(tmp_path, minilm):
    from m4v.cli import main

    out = tmp_path / "run"
    stages = json.dumps(STAGES[:1] + [dict(STAGES[1], steps=1)])
    code = main(["train", "--config", str(CONFIG), "--output-dir", str(out), "--set", f"stages={stages}",
                 "--set", "data.moving_shapes.num_samples=8", "--set", "logging.progress=false",
                 "--set", "logging.tensorboard=false", "--set", "checkpoint.every=2"])
    assert code == 0
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    assert [r["kind"] for r in rows] == ["image", "image", "video"]
    assert (out / "checkpoints" / "step-00000002" / "meta.json").is_file()
    final = out / "final"
    index = json.loads((final / "model_index.json").read_text())
    assert index["_class_name"] == "M4VWanPipeline" and index["text_encoder"] == "minilm"
    assert index["default_size"] == [32, 32] and index["default_frames"] == 9
    pipe = M4VWanPipeline.from_pretrained(final, text_encoder=minilm)
    pipe.set_progress_bar_config(disable=True)
    video = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 9, 32, 32, 3) and np.isfinite(video).all()
    ema = M4VWanTransformer.from_pretrained(final / "transformer_ema")
    assert ema.config.num_layers == 3 and ema.config.family == "wan"


def test_loss_decreases_resume_is_exact_and_export(tmp_path, minilm):
    common = dict(optim={"lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0},
                  ema={"decay": 0.9})
    straight = Trainer(wan_config(tmp_path / "a", checkpoint={"export_final": True, "resume": "none"}, **common),
                       text_encoder=minilm)
    assert isinstance(straight.model, M4VWanTransformer)
    assert all(p.pyramid_stage == 0 and p.frame_index == p.num_latent_frames - 1
               for p in (straight.planner.plan(m) for m in range(4)))
    assert straight.planner.plan(3).num_latent_frames == 3  # 9 frames through Wan's 4x VAE
    val = [2, 3]  # video micro-steps: a fixed validation set
    before = straight.evaluate(val)
    full = [r["loss"] for r in straight.train()]
    after = straight.evaluate(val)
    assert all(math.isfinite(v) for v in full) and after < before

    ckpt = {"every": 100, "export_final": False, "resume": "auto"}
    first = Trainer(wan_config(tmp_path / "b", checkpoint=ckpt, **common), text_encoder=minilm)
    part1 = [r["loss"] for r in first.train(stop_at=3)]
    second = Trainer(wan_config(tmp_path / "b", checkpoint=ckpt, **common), text_encoder=minilm)
    assert second.step == 3
    part2 = [r["loss"] for r in second.train()]
    assert part1 + part2 == full  # bitwise
    a, b = _params(straight.model), _params(second.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(straight.ema.shadow[n], second.ema.shadow[n]) for n in a)
    sa, sb = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(v["exp_avg"], sb[k]["exp_avg"]) for k, v in sa.items())

    model = M4VWanTransformer.from_pretrained(tmp_path / "a" / "final" / "transformer")
    assert all(torch.equal(p, a[n]) for n, p in model.named_parameters())
    ema = load_file(str(tmp_path / "a" / "final" / "transformer_ema" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ema[n], v) for n, v in straight.ema.shadow.items())


def test_pretrained_from_a_converted_folder(tmp_path, minilm):
    """model.pretrained: the output of 'm4v convert --from-wan' (DIR/transformer); vae: DIR/vae or DIR."""
    src = _tiny_model(seed=3)
    src.save_pretrained(tmp_path / "m" / "transformer")
    load_wan_vae("wan-tiny", seed=5).model.save_pretrained(tmp_path / "m" / "vae")
    cfg = wan_config(tmp_path / "run", model={"family": "wan", "pretrained": str(tmp_path / "m")},
                     vae=str(tmp_path / "m"))
    trainer = Trainer(cfg, text_encoder=minilm)
    ref = _params(src)
    assert all(torch.equal(p, ref[n]) for n, p in _params(trainer.model).items())
    vae_ref = _params(load_wan_vae("wan-tiny", seed=5))
    assert all(torch.equal(p, vae_ref[n]) for n, p in _params(trainer.vae).items())
    with pytest.raises(ValueError, match="^model.pretrained: .* has no config.json"):
        Trainer(wan_config(tmp_path / "r2", model={"family": "wan", "pretrained": str(tmp_path)}), text_encoder=minilm)
    pretrained = {"family": "pyramidflow", "pretrained": str(tmp_path / "m" / "transformer")}
    pyr = wan_config_dict(tmp_path / "r3", model=pretrained, vae="tiny")
    pyr["stages"] = [dict(steps=1, height=64, width=64, num_frames=9, batch_size=2)]
    with pytest.raises(ValueError, match="^model.pretrained: .*set model.family: wan"):
        Trainer(validate(from_dict(TrainConfig, pyr, "")), text_encoder=minilm)


def test_prepared_wan_shards_train_like_pixels(tmp_path, minilm):
    """m4v prepare with a Wan VAE stores whole-video Wan latents; training from them equals training on pixels."""
    from m4v.training.shards import prepare

    video = [dict(STAGES[1], steps=2)]
    cfg = wan_config(tmp_path / "fly", stages=video)
    vae = load_wan_vae("wan-tiny", seed=cfg.seed)
    prepare("moving_shapes", cfg.data, tmp_path / "shards", [(32, 32, 9)], vae, minilm,
            {"vae": "wan-tiny", "text_encoder": "minilm"}, dtype="float32", progress=False)
    index = json.loads((tmp_path / "shards" / "32x32x9" / "index.json").read_text())
    assert {it["frames"] for it in index["items"]} == {3}  # 9 frames -> 1 + 2 latent frames
    assert index["num_latent_frames"] == 3  # recorded from the encoded latents, not an 8x rule
    fly = [r["loss"] for r in Trainer(cfg, text_encoder=minilm).train()]
    shards = wan_config(tmp_path / "sh", stages=video, data={"source": str(tmp_path / "shards")})
    trainer = Trainer(shards)
    assert trainer.vae is None and trainer.text_encoder is None
    from_shards = [r["loss"] for r in trainer.train()]
    assert from_shards == pytest.approx(fly, rel=1e-4)


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"objective": {"stage_weights": [1, 1, 1]}}, "objective.stage_weights"),
        ({"objective": {"scheduler": {"num_stages": 3, "stage_range": [0, 0.5, 1]}}}, "objective.scheduler"),
        ({"objective": {"corruption": "constant"}}, "objective.corruption"),
        ({"objective": {"shift": 0.0}}, "objective.shift"),
        ({"stages": [dict(STAGES[1], frame_window=2)]}, r"stages\[0\].frame_window"),
        ({"stages": [dict(STAGES[1], num_frames=7)]}, r"stages\[0\].num_frames"),
        ({"stages": [dict(STAGES[1], height=40)]}, r"stages\[0\].height"),
        ({"stages": [dict(STAGES[1], reward=True)]}, r"stages\[0\].reward"),
        ({"reward": {"clip_dir": "/x"}}, "reward"),
        ({"vae": "tiny"}, "vae"),
        ({"model": {"family": "wan", "config": "tiny"}}, "model.config"),
        ({"model": {"family": "sora"}}, "model.family"),
        ({"model": {"config": "wan-tiny"}}, "model.family"),
        ({"data": {"source": "/videos.csv"}}, r"stages\[0\].num_frames"),
    ],
)
def test_pyramid_only_and_bad_options_name_the_field(tmp_path, patch, field):
    d = wan_config_dict(tmp_path, **patch)
    if "model" in patch:
        d["model"] = patch["model"]
    if "data" in patch:
        d["stages"] = [dict(STAGES[1], num_frames=5)]
    with pytest.raises(ValueError, match=rf"^{field}:"):
        validate(from_dict(TrainConfig, d, ""))


def test_wan_geometry_is_accepted(tmp_path):
    cfg = wan_config(tmp_path, stages=[dict(steps=1, height=48, width=80, num_frames=5, batch_size=1)],
                     objective={"shift": 3.0})
    assert cfg.model.family == "wan" and cfg.objective.shift == 3.0
    pyr = wan_config_dict(tmp_path, model={"family": "pyramidflow", "config": "tiny"}, vae="tiny",
                          objective={"shift": 5.0})
    pyr["stages"] = [dict(steps=1, height=64, width=64, num_frames=9, batch_size=2)]
    with pytest.raises(ValueError, match="^objective.shift:"):
        validate(from_dict(TrainConfig, pyr, ""))
