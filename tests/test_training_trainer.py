"""The training loop (paper Sec. 3, D.1): text-to-image / text-to-video / mixed steps, exact resume, export, logs."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from m4v.training.metrics import read_metrics
from m4v.training.testing import tiny_config
from m4v.training.text import HashTextEncoder
from m4v.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize(
    "mode, stage",
    [
        ("t2i", {"num_frames": 1, "image_ratio": 1.0}),
        ("t2v", {"num_frames": 17, "image_ratio": 0.0}),
        ("mixed", {"num_frames": 9, "image_ratio": 0.5}),
    ],
)
def test_modes_train_a_few_steps(tmp_path, mode, stage):
    stages = [dict(steps=4, height=64, width=64, batch_size=2, **stage)]
    cfg = tiny_config(tmp_path, stages=stages, logging={"every": 2, "progress": False, "tensorboard": True})
    trainer = Trainer(cfg)
    before = _params(trainer)
    history = trainer.train()
    assert len(history) == 4 and trainer.step == 4
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in history)
    kinds = {r["kind"] for r in history}
    frames = {f for r in history for f in r["frames"]}
    if mode == "t2i":
        assert kinds == {"image"} and frames == {0}
    elif mode == "t2v":
        assert kinds == {"video"}
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in history)
    after = _params(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 3]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "pyramid_stage", "skipped"} <= set(rows[0])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_is_exact(tmp_path):
    stages = [
        dict(steps=2, height=64, width=64, num_frames=1, batch_size=2, name="t2i"),
        dict(steps=3, height=64, width=64, num_frames=9, image_ratio=0.3, batch_size=2, name="t2v"),
    ]
    common = dict(stages=stages, optim={"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"}, ema={"decay": 0.9})
    straight = Trainer(tiny_config(tmp_path / "a", **common))
    full = [r["loss"] for r in straight.train()]

    ckpt = {"every": 100, "export_final": False, "resume": "auto"}
    first = Trainer(tiny_config(tmp_path / "b", checkpoint=ckpt, **common))
    part1 = [r["loss"] for r in first.train(stop_at=3)]
    assert (tmp_path / "b" / "checkpoints" / "step-00000003" / "meta.json").is_file()
    second = Trainer(tiny_config(tmp_path / "b", checkpoint=ckpt, **common))
    assert second.step == 3
    part2 = [r["loss"] for r in second.train()]
    assert part1 + part2 == full  # bitwise
    a, b = _params(straight), _params(second)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(straight.ema.shadow[n], second.ema.shadow[n]) for n in a)
    sa, sb = straight.optimizer.state_dict(), second.optimizer.state_dict()
    for k, v in sa["state"].items():
        assert torch.equal(v["exp_avg_sq"], sb["state"][k]["exp_avg_sq"])
        assert float(v["step"]) == float(sb["state"][k]["step"]) == 5
    # the CSV of the resumed run has every step once
    steps = [int(r["step"]) for r in read_metrics(tmp_path / "b" / "metrics.csv")]
    assert steps == list(range(5))


def test_gradient_checkpointing_and_accumulation(tmp_path):
    stages = [dict(steps=2, height=64, width=64, num_frames=9, batch_size=2)]
    plain = Trainer(tiny_config(tmp_path / "p", stages=stages)).train()
    ckpt = Trainer(tiny_config(tmp_path / "c", stages=stages, train={"gradient_checkpointing": True})).train()
    for a, b in zip(plain, ckpt):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    acc = Trainer(tiny_config(tmp_path / "g", stages=stages, train={"grad_accum": 2}))
    hist = acc.train()
    assert [len(r["pyramid_stages"]) for r in hist] == [2, 2]
    assert all(r["loss"] == pytest.approx(sum(r["micro_flow"]) / 2, rel=1e-6) for r in hist)


def test_export_and_null_text(tmp_path):
    from m4v.models import M4VTransformer

    stages = [dict(steps=2, height=64, width=64, num_frames=9, batch_size=2)]
    cfg = tiny_config(tmp_path, stages=stages, checkpoint={"export_final": True, "every": 1, "keep": 1},
                      ema={"decay": 0.5})
    enc = HashTextEncoder(dim=384)
    trainer = Trainer(cfg, text_encoder=enc)
    null = enc([""])
    torch.testing.assert_close(trainer.null_text.token_states.cpu(), null.token_states)
    torch.testing.assert_close(trainer.null_text.pooled.cpu(), null.pooled)
    trainer.train()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]  # keep=1
    model = M4VTransformer.from_pretrained(tmp_path / "final" / "transformer")
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(trainer.model.named_parameters())[n].detach())
    ema = load_file(str(tmp_path / "final" / "transformer_ema" / "diffusion_pytorch_model.safetensors"))
    for n, v in trainer.ema.shadow.items():
        assert torch.equal(ema[n], v)
    assert any(not torch.equal(ema[n], dict(model.named_parameters())[n]) for n in trainer.ema.names)
    # evaluate() is repeatable and does not change the weights
    before = _params(trainer)
    e1, e2 = trainer.evaluate([0, 1]), trainer.evaluate([0, 1])
    assert e1 == e2 and math.isfinite(e1)
    assert all(torch.equal(before[n], p) for n, p in _params(trainer).items())
    assert trainer.evaluate([0, 1], use_ema=True) != e1
    assert all(torch.equal(before[n], p) for n, p in _params(trainer).items())
    # resuming this run with another model is a clear error
    other = tiny_config(tmp_path, stages=stages, model={"overrides": {"layout": "full_attn"}},
                        checkpoint={"resume": "auto"})
    with pytest.raises(ValueError, match="does not fit this model"):
        Trainer(other)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    stages = [dict(steps=1, height=64, width=64, num_frames=9, batch_size=2)]
    plain = Trainer(tiny_config(tmp_path / "f", stages=stages)).train()
    bf16 = Trainer(tiny_config(tmp_path / "b", stages=stages, train={"precision": "bf16"}))
    assert bf16.autocast_dtype == torch.bfloat16
    hist = bf16.train()
    assert hist[0]["loss"] == pytest.approx(plain[0]["loss"], rel=0.05)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # fp32 master weights


def test_clear_errors(tmp_path):
    stages = [dict(steps=1, height=64, width=64, num_frames=9, batch_size=2)]
    with pytest.raises(ValueError, match="expects text_dim=384"):
        Trainer(tiny_config(tmp_path, stages=stages, text_encoder={"hash": {"dim": 128}}))
    with pytest.raises(ValueError, match="does not exist"):
        Trainer(tiny_config(tmp_path, stages=stages, data={"source": str(tmp_path / "missing")}))
    with pytest.raises(ValueError, match="not a save_pretrained folder"):
        Trainer(tiny_config(tmp_path, stages=stages, model={"pretrained": str(tmp_path)}))


def test_data_workers_do_not_change_the_run(tmp_path):
    stages = [dict(steps=3, height=64, width=64, num_frames=9, image_ratio=0.5, batch_size=2)]
    ref = Trainer(tiny_config(tmp_path / "w0", stages=stages)).train()
    two = Trainer(tiny_config(tmp_path / "w2", stages=stages, data={"num_workers": 2})).train()
    assert [r["loss"] for r in ref] == [r["loss"] for r in two]


def test_time_limit_stops_checkpoints_and_exports(tmp_path):
    """--time-limit: the first step that ends past the limit is the last; checkpoint and final/ are written."""
    stages = [dict(steps=50, height=64, width=64, num_frames=1, batch_size=2)]
    cfg = tiny_config(tmp_path, stages=stages, checkpoint={"export_final": True, "every": 100, "keep": 1})
    trainer = Trainer(cfg)
    history = trainer.train(time_limit=1e-9)
    assert len(history) == 1 and trainer.step == 1
    assert (tmp_path / "checkpoints" / "step-00000001" / "meta.json").is_file()
    assert (tmp_path / "final" / "transformer" / "config.json").is_file()
    resumed = Trainer(tiny_config(tmp_path, stages=stages, checkpoint={"resume": "auto", "every": 100}))
    assert resumed.step == 1
    assert len(resumed.train(stop_at=3)) == 2
