"""``m4v train-vae``: reconstruction + KL loss, a few steps, exact resume, export as a VideoVAE folder."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import run_cli

from m4v.data import MovingShapes
from m4v.models.vae import VideoVAE
from m4v.training.metrics import read_metrics
from m4v.training.vae_training import VAELossConfig, VAEModelConfig, build_autoencoder, vae_loss

pytestmark = pytest.mark.usefixtures("one_thread")




def test_loss_matches_a_float64_reference():
    model = build_autoencoder(VAEModelConfig("tiny"), seed=0)
    video = MovingShapes(2, 64, 64, 9)[0]["video"][None].repeat(2, 1, 1, 1, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    cfg = VAELossConfig(reconstruction="l1", kl_weight=0.01)
    loss, parts = vae_loss(model, video, gens, cfg)
    with torch.no_grad():
        post = model.encode(video).latent_dist
        noise = torch.stack([torch.randn(post.mean.shape[1:], generator=torch.Generator().manual_seed(i))
                             for i in range(2)])
        rec = model.decode(post.mean + post.std * noise).sample
    mean, logvar = post.mean.double(), post.logvar.double()
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
    l1 = (rec.double() - video.double()).abs().mean()
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert parts["recon"].item() == pytest.approx(l1.item(), rel=1e-5)
    assert loss.item() == pytest.approx(l1.item() + 0.01 * kl.item(), rel=1e-5)
    _, mse = vae_loss(model, video, gens, VAELossConfig(reconstruction="mse", sample_posterior=False))
    assert mse["recon"].item() == pytest.approx(((model.decode(post.mean).sample - video) ** 2).mean().item(), rel=1e-4)


def _config(tmp_path, out: str, resume: str = "none") -> str:
    cfg = {
        "seed": 0,
        "output_dir": str(tmp_path / out),
        "vae": {"config": "tiny"},
        "data": {"source": "moving_shapes", "moving_shapes": {"num_samples": 4}},
        "loss": {"reconstruction": "l1", "kl_weight": 1e-6, "norm_samples": 2},
        "optim": {"lr": 1e-3},
        "checkpoint": {"every": 2, "resume": resume},
        "logging": {"every": 1, "progress": False, "tensorboard": False},
        "stages": [
            {"steps": 2, "height": 64, "width": 64, "num_frames": 1, "batch_size": 2},
            {"steps": 1, "height": 64, "width": 64, "num_frames": 9, "image_ratio": 0.0, "batch_size": 1},
        ],
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_train_vae_resume_and_export(tmp_path):
    assert run_cli(["train-vae", "--config", _config(tmp_path, "a")]) == 0
    straight = read_metrics(tmp_path / "a" / "vae_metrics.csv")
    assert [r["kind"] for r in straight] == ["image", "image", "video"]
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["optim"]["lr"] == pytest.approx(1e-3)
    assert all(float(r["loss"]) > 0 for r in straight)
    assert run_cli(["train-vae", "--config", _config(tmp_path, "b"), "--stop-at", "2"]) == 0
    assert run_cli(["train-vae", "--config", _config(tmp_path, "b", resume="auto")]) == 0
    resumed = read_metrics(tmp_path / "b" / "vae_metrics.csv")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    a = VideoVAE.from_pretrained(tmp_path / "a" / "final" / "vae")
    b = VideoVAE.from_pretrained(tmp_path / "b" / "final" / "vae")
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k
    # the exported latent normalisation is fitted on encoded clips of the video stage
    clips = torch.stack([MovingShapes(4, 64, 64, 9)[i]["video"] for i in range(2)])
    raw = a.encode_raw(clips, sample=False)
    assert a.latent_norm.first_shift == pytest.approx(-raw[:, :, :1].double().mean().item(), rel=1e-4, abs=1e-6)
    assert a.latent_norm.rest_scale == pytest.approx(raw[:, :, 1:].double().std().item(), rel=1e-4)
    z = a.encode(clips, sample=False)
    assert abs(z[:, :, 1:].mean().item()) < 1e-4 and z[:, :, 1:].std().item() == pytest.approx(1.0, rel=1e-3)


def test_bad_vae_config(tmp_path):
    path = _config(tmp_path, "c")
    with pytest.raises(ValueError, match="loss.reconstruction"):
        run_cli(["train-vae", "--config", path, "--set", "loss.reconstruction=l3"])
    with pytest.raises(ValueError, match="vae.config: unknown VAE config"):
        run_cli(["train-vae", "--config", path, "--set", "vae.config=huge"])


def test_train_vae_time_limit_exports(tmp_path):
    """--time-limit through the CLI: one step, a checkpoint and the final VideoVAE export."""
    assert run_cli(["train-vae", "--config", _config(tmp_path, "t"), "--time-limit", "1e-9"]) == 0
    assert [int(r["step"]) for r in read_metrics(tmp_path / "t" / "vae_metrics.csv")] == [0]
    assert VideoVAE.from_pretrained(tmp_path / "t" / "final" / "vae").latent_channels == 16
    with pytest.raises(ValueError, match="--time-limit"):
        run_cli(["train-vae", "--config", _config(tmp_path, "u"), "--time-limit", "0"])


def test_decoder_only_fine_tune_keeps_encoder_and_latent_norm(tmp_path):
    """vae.freeze_encoder: the decoder trains, encoder weights and latent normalisation stay the pretrained ones."""
    assert run_cli(["train-vae", "--config", _config(tmp_path, "p")]) == 0
    pre_dir = tmp_path / "p" / "final" / "vae"
    pre = VideoVAE.from_pretrained(pre_dir)
    path = _config(tmp_path, "f")
    over = ["--set", f"vae.pretrained={pre_dir}", "--set", "vae.freeze_encoder=true", "--set", "optim.lr=0.01"]
    assert run_cli(["train-vae", "--config", path, *over]) == 0
    ft = VideoVAE.from_pretrained(tmp_path / "f" / "final" / "vae")
    assert ft.latent_norm == pre.latent_norm
    a, b = pre.model.state_dict(), ft.model.state_dict()
    enc = [k for k in a if not k.startswith("decoder.")]
    dec = [k for k in a if k.startswith("decoder.") and a[k].is_floating_point()]
    assert enc and dec
    for k in enc:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], b[k]) for k in dec)
    with pytest.raises(ValueError, match="vae.freeze_encoder: needs vae.pretrained"):
        run_cli(["train-vae", "--config", path, "--set", "vae.freeze_encoder=true"])
