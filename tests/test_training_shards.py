"""``m4v prepare`` latent shards and bad-data accounting of the training data stream."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli
from PIL import Image
from safetensors import safe_open

from m4v.data import MovingShapes
from m4v.io.video import write_video
from m4v.training.components import load_vae
from m4v.training.metrics import read_metrics
from m4v.training.testing import tiny_config, tiny_config_dict
from m4v.training.text import HashTextEncoder
from m4v.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")




STAGES = [
    dict(steps=2, height=64, width=64, num_frames=1, batch_size=2),
    dict(steps=3, height=64, width=64, num_frames=9, image_ratio=0.0, batch_size=2),
]


def test_prepare_moving_shapes_and_train_from_shards(tmp_path, capsys):
    d = tiny_config_dict(tmp_path / "run", stages=STAGES, data={"moving_shapes": {"num_samples": 5}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    out = tmp_path / "shards"
    assert run_cli(["prepare", "--data", "moving_shapes", "--out", str(out), "--config", str(tmp_path / "c.yaml"),
                 "--dtype", "float32", "--batch-size", "2", "--shard-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "64x64x1: 5 items, 0 skipped" in printed and "64x64x9: 5 items, 0 skipped" in printed
    top = json.loads((out / "index.json").read_text())
    assert set(top["geometries"]) == {"64x64x1", "64x64x9"} and top["vae"] == "tiny"
    index = json.loads((out / "64x64x9" / "index.json").read_text())
    assert [it["index"] for it in index["items"]] == list(range(5))
    assert index["num_latent_frames"] == 2  # 9 frames through the 8x VAE
    assert len({it["shard"] for it in index["items"]}) == 2  # shard size 3
    # independent check: the stored latents are the VAE posterior means of the rendered clips
    vae, enc = load_vae("tiny"), HashTextEncoder(dim=384)
    ds = MovingShapes(5, 64, 64, 9)
    for it in index["items"][:2]:
        with safe_open(str(out / "64x64x9" / it["shard"]), "pt") as f:
            lat = f.get_tensor(f"{it['key']}/latents")
            txt = f.get_tensor(f"{it['key']}/text")
        x = ds[it["index"]]
        assert x["caption"] == it["caption"]
        ref = vae.encode(x["video"][None], sample=False)[0]
        torch.testing.assert_close(lat, ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(txt, enc([x["caption"]]).token_states[0])
    with safe_open(str(out / "null_text.safetensors"), "pt") as f:
        torch.testing.assert_close(f.get_tensor("token_states"), enc([""]).token_states[0])

    # training from shards matches training on the fly (video batches; image batches of the shards are
    # latent frame 0 of the same clips, those of on-the-fly Moving Shapes are separate one-frame clips)
    video = [dict(steps=3, height=64, width=64, num_frames=9, image_ratio=0.0, batch_size=2)]
    msd = {"source": "moving_shapes", "moving_shapes": {"num_samples": 5}}
    fly = Trainer(tiny_config(tmp_path / "fly", stages=video, data=msd)).train()
    shard = Trainer(tiny_config(tmp_path / "sh", stages=video, data={"source": str(out)}))
    assert shard.vae is None and shard.text_encoder is None  # nothing to encode
    for a, b in zip(fly, shard.train()):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    mixed = Trainer(tiny_config(tmp_path / "mx", stages=STAGES, data={"source": str(out)})).train()
    assert [r["kind"] for r in mixed[:2]] == ["image", "image"]

    bad = [dict(steps=1, height=128, width=64, num_frames=9, batch_size=2)]
    with pytest.raises(ValueError, match="no latents for 128x64x9"):
        Trainer(tiny_config(tmp_path / "bad", stages=bad, data={"source": str(out)}))

    # decoding in 2 worker processes writes the same shards, in the same order
    par = tmp_path / "shards2"
    assert run_cli(["prepare", "--data", "moving_shapes", "--out", str(par), "--config", str(tmp_path / "c.yaml"),
                    "--dtype", "float32", "--batch-size", "2", "--shard-size", "3", "--num-workers", "2"]) == 0
    assert json.loads((par / "64x64x9" / "index.json").read_text()) == index
    for shard in sorted({it["shard"] for it in index["items"]}):
        with safe_open(str(out / "64x64x9" / shard), "pt") as f, safe_open(str(par / "64x64x9" / shard), "pt") as g:
            assert sorted(f.keys()) == sorted(g.keys())
            assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())


def _grey_video(path: Path, frames: int) -> None:
    rng = np.random.default_rng(frames)
    write_video(path, rng.integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8), fps=8)


def _bad_folder(root: Path) -> Path:
    root.mkdir()
    for i in range(2):
        _grey_video(root / f"good{i}.mp4", 12)
        (root / f"good{i}.txt").write_text(f"a red circle moving up {i}")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "img.png")
    (root / "img.txt").write_text("a black background")
    (root / "broken.mp4").write_bytes(b"this is not a video")
    (root / "broken.txt").write_text("broken")
    _grey_video(root / "short.mp4", 4)
    (root / "short.txt").write_text("too short")
    _grey_video(root / "nocaption.mp4", 12)
    return root


def test_bad_items_are_skipped_and_counted(tmp_path, caplog):
    src = _bad_folder(tmp_path / "videos")
    stage = dict(steps=2, height=64, width=64, num_frames=9, image_ratio=0.0, batch_size=2)
    # prepare counts every bad item once
    cfg = tiny_config_dict(tmp_path / "run", stages=[stage])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli(["prepare", "--data", str(src), "--out", str(tmp_path / "sh"), "--config", str(tmp_path / "c.yaml"),
                 "--dtype", "float32"]) == 0
    geo = json.loads((tmp_path / "sh" / "64x64x9" / "index.json").read_text())
    assert geo["skipped"] == {"missing_caption": 1, "unreadable": 1, "too_few_frames": 1}
    assert sorted(Path(it["source"]).name for it in geo["items"]) == ["good0.mp4", "good1.mp4", "img.png"]
    # training on the fly: the two bad videos are met in the first epoch of the video pool
    trainer = Trainer(tiny_config(tmp_path / "fly", stages=[stage], data={"source": str(src)}))
    with caplog.at_level(logging.WARNING):
        history = trainer.train()
    assert len(history) == 2 and all(np.isfinite(r["loss"]) for r in history)
    assert trainer.skipped() == {"missing_caption": 1, "unreadable": 1, "too_few_frames": 1}
    assert read_metrics(tmp_path / "fly" / "metrics.csv")[-1]["skipped"] == "3"
    assert any("skipped 3 bad items" in r.message for r in caplog.records)


def test_skips_of_one_source_at_several_geometries_count_once(tmp_path):
    """The files a source skipped are counted once over its geometries (per reason, the largest count), and
    separately for different sources."""
    from collections import Counter
    from types import SimpleNamespace

    from m4v.training.data import SourceSet
    from m4v.training.testing import tiny_config

    sources = SourceSet.__new__(SourceSet)
    sources.cfg = tiny_config(tmp_path)
    sources._sources = {
        0: SimpleNamespace(skip_key="shards", construction_skips=Counter(unreadable=2, too_short=1)),
        1: SimpleNamespace(skip_key="shards", construction_skips=Counter(unreadable=2, too_short=3)),
        2: SimpleNamespace(skip_key="other", construction_skips=Counter(unreadable=1)),
    }
    assert sources.construction_skips() == Counter(unreadable=3, too_short=3)
