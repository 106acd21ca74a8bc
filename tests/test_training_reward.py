"""Reward learning (paper Sec. 3.4, Eqs. 5-6): one-step denoise, CLIP preprocessing, reward models, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m4v.models.vae import build_video_vae
from m4v.schedulers import PyramidFlowMatchScheduler
from m4v.training.config import RewardConfig
from m4v.training.reward import (
    CLIP_MEAN,
    CLIP_STD,
    AestheticHead,
    RewardLearner,
    RewardScorer,
    clip_preprocess,
    decode_last_frames,
    load_aesthetic_head,
    predict_clean,
    save_aesthetic_head,
)
from m4v.training.testing import make_tiny_clip, tiny_config
from m4v.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    make_tiny_clip(root / "clip")
    torch.manual_seed(0)
    save_aesthetic_head(root / "aes", AestheticHead([16, 8, 1], activation="gelu"))
    return root / "clip", root / "aes"


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_eq5_one_step_denoise_recovers_the_clean_latent(stage):
    sched = PyramidFlowMatchScheduler()
    torch.manual_seed(stage)
    clean = torch.randn(3, 4, 16, 16, dtype=torch.float64)
    noise = torch.randn_like(clean)
    ratio = torch.tensor([0.05, 0.5, 0.95])
    noisy, target, _ = sched.sample_training_input(clean, stage, noise_full=noise, ratio=ratio)
    eps = F.avg_pool2d(noise, 2 ** (2 - stage)) * 2 ** (2 - stage) if stage < 2 else noise
    x_hat = predict_clean(noisy, target, ratio, sched.stage_windows[stage], eps)
    expect = F.avg_pool2d(clean, 2 ** (2 - stage)) if stage < 2 else clean
    torch.testing.assert_close(x_hat, expect, atol=1e-9, rtol=1e-9)
    # the paper's form (time t = 1 - sigma, x_0 = noise): x1 = (x_t + (se - st)/(se - ss) v - (1 - se) x0) / se
    s, e = sched.stage_windows[stage]
    sigma = ratio.double() * s + (1 - ratio.double()) * e
    ts, te, tt = 1 - s, 1 - e, 1 - sigma
    paper = (noisy + ((te - tt) / (te - ts)).view(-1, 1, 1, 1) * (-target) - (1 - te) * eps) / te
    torch.testing.assert_close(paper, expect, atol=1e-9, rtol=1e-9)


def test_clip_preprocess():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(clip_preprocess(x, 32), ((x + 1) / 2 - mean) / std, atol=1e-5, rtol=1e-5)
    const = torch.full((1, 3, 48, 80), 0.2)
    out = clip_preprocess(const, 32)
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out, ((torch.full_like(out, 0.6)) - mean) / std, atol=1e-5, rtol=1e-5)
    # centre crop: a wide image whose left and right thirds differ keeps only the middle
    wide = torch.full((1, 3, 32, 96), -1.0)
    wide[..., 32:64] = 1.0
    torch.testing.assert_close(clip_preprocess(wide, 32), ((torch.ones(1, 3, 32, 32)) - mean) / std)
    g = torch.zeros(1, 3, 40, 40, requires_grad=True)
    clip_preprocess(g, 32).sum().backward()
    assert g.grad.abs().sum() > 0


def test_aesthetic_head_round_trip(tmp_path):
    torch.manual_seed(1)
    head = AestheticHead([16, 8, 4, 1], activation="none")
    save_aesthetic_head(tmp_path, head)
    again = load_aesthetic_head(tmp_path)
    e = torch.randn(5, 16)
    torch.testing.assert_close(again(e), head(e))
    x = F.normalize(e, dim=-1)
    for layer in head.layers:  # LAION-style: a stack of linear layers on the normalised embedding
        x = x @ layer.weight.T + layer.bias
    torch.testing.assert_close(head(e), x.squeeze(-1))
    with pytest.raises(ValueError, match="must hold"):
        load_aesthetic_head(tmp_path / "missing")


def test_scorer_matches_clip_forward(reward_dirs):
    from transformers import AutoTokenizer, CLIPModel

    clip_dir, aes_dir = reward_dirs
    scorer = RewardScorer(str(clip_dir), str(aes_dir))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    prompts = ["a red circle moving up", "a big blue square on a black background"]
    out = scorer(images, prompts)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)(prompts, padding=True, return_tensors="pt")
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                    pixel_values=((images + 1) / 2 - mean) / std)
    cos = ref.logits_per_image.diag() / model.logit_scale.exp()
    torch.testing.assert_close(out["clip"], cos, atol=1e-5, rtol=1e-4)
    head = load_aesthetic_head(aes_dir)
    torch.testing.assert_close(out["aesthetic"], head(ref.image_embeds), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="not a loadable CLIPModel folder"):
        RewardScorer(str(aes_dir), None)
    with pytest.raises(ValueError, match="no config.json"):
        RewardScorer(str(aes_dir / "nothing"), None)


def test_decode_with_context_and_gradients(reward_dirs):
    torch.manual_seed(0)
    vae = build_video_vae("tiny")
    clean = torch.randn(2, 16, 3, 8, 8)
    pred = torch.randn(2, 16, 8, 8, requires_grad=True)
    frames = decode_last_frames(vae, pred, clean, 2, context=1, num_pixel_frames=8, checkpoint=False)
    assert frames.shape == (2, 8, 3, 64, 64)
    z = torch.stack([clean[:, :, 1], pred.detach()], 2)
    n = vae.latent_norm
    z = z * n.rest_scale - n.rest_shift  # neither frame is the clip's first
    with torch.no_grad():
        full = vae.model.decode(z).sample
    torch.testing.assert_close(frames.detach(), full[:, :, 1:].permute(0, 2, 1, 3, 4), atol=1e-5, rtol=1e-5)
    one = decode_last_frames(vae, pred, clean, 0, context=1, num_pixel_frames=4, checkpoint=True)
    assert one.shape == (2, 1, 3, 64, 64)  # frame 0 decodes to one pixel frame
    frames.square().mean().backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0

    cfg = RewardConfig(clip_dir=str(reward_dirs[0]), aesthetic_dir=str(reward_dirs[1]), aesthetic_weight=0.5)
    learner = RewardLearner(cfg, vae)
    v = torch.randn(2, 16, 8, 8, requires_grad=True)
    args = (torch.randn(2, 16, 8, 8), v, torch.tensor([0.3, 0.6]), torch.randn(2, 16, 8, 8), (0.5, 0.0), clean, 2,
            ["a red circle", "a blue square"])
    loss, stats = learner.loss(*args, keep=torch.tensor([True, True]))
    assert loss.item() == pytest.approx(-(stats["r_clip"] + 0.5 * stats["r_aesthetic"]), rel=1e-5)
    loss.backward()
    assert v.grad.abs().sum() > 0  # through the decoder and CLIP into the velocity
    zero, none = learner.loss(*args, keep=torch.tensor([False, False]))
    assert zero.item() == 0 and none == {}


def test_reward_stage_trains_and_sends_gradients_to_the_transformer(tmp_path, reward_dirs):
    clip_dir, aes_dir = reward_dirs
    stage = dict(steps=2, height=64, width=64, num_frames=17, image_ratio=0.0, batch_size=2, reward=True)

    def run(weight: float, out: str) -> list[dict]:
        reward = {"clip_dir": str(clip_dir), "aesthetic_dir": str(aes_dir), "weight": weight, "frame_window": 2}
        cfg = tiny_config(tmp_path / out, stages=[stage], reward=reward, objective={"text_dropout": 0.0})
        return Trainer(cfg).train()

    with_reward, without = run(0.1, "r"), run(0.0, "n")
    assert with_reward[0]["flow_loss"] == without[0]["flow_loss"]
    assert with_reward[0]["grad_norm"] != without[0]["grad_norm"]
    for r in with_reward:
        assert r["frames"][0] >= 1  # frame_window 2 of 3 latent frames: the last two
        assert math.isfinite(r["r_clip"]) and math.isfinite(r["r_aesthetic"])
        assert r["loss"] == pytest.approx(r["flow_loss"] + 0.1 * r["reward_loss"], rel=1e-5)
        assert r["reward_loss"] == pytest.approx(-(r["r_clip"] + r["r_aesthetic"]), rel=1e-5)
