"""M4VPipeline: oracle velocity field through the autoregressive pyramid, seeds, image-to-video, guidance."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import randomize_
from torch import nn

from m4v.models import M4VTransformer, named_config
from m4v.models.text_encoders import load_text_encoder
from m4v.models.vae import build_video_vae
from m4v.pipelines import M4VPipeline
from m4v.schedulers import PyramidFlowMatchScheduler


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder("minilm")


@pytest.fixture(scope="module")
def pipe(text_encoder):
    torch.manual_seed(0)
    return M4VPipeline(randomize_(M4VTransformer(**named_config("tiny"))), build_video_vae("tiny"), text_encoder,
                       PyramidFlowMatchScheduler())


class Oracle(nn.Module):
    """Knows the clean latent c (constant per channel and per frame index) and returns the exact velocity.

    The scheduler's velocity is start - end = (s_k - e_k) * dx/dsigma with dx/dsigma = eps - c and
    eps = (x - (1 - sigma) c) / sigma, for the stage k whose resolution x has.
    """

    def __init__(self, targets, full_hw, windows):
        super().__init__()
        self.config = SimpleNamespace(in_channels=16, patch_size=2, text_dim=384, pooled_dim=384)
        self.targets, self.full_h, self.windows = targets, full_hw[0], windows
        self.calls = []
        self.dummy = nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.dummy.device

    @property
    def dtype(self):
        return self.dummy.dtype

    def forward(self, x, t, states, pooled, mask, history=()):
        n = len(self.calls_for_frame(history))
        stage = 2 - int(np.log2(self.full_h // x.shape[-2]))
        s, e = self.windows[stage]
        sigma = t.float()[:, None, None, None] / 1000
        c = self.targets[n].to(x)[None, :, None, None]
        v = (s - e) * ((x - (1 - sigma) * c) / sigma - c)
        self.calls.append((n, stage, [tuple(h.shape[-2:]) for h in history], x.shape[0]))
        return SimpleNamespace(sample=v)

    @staticmethod
    def calls_for_frame(history):
        return history


def test_oracle_velocity_lands_on_target_and_history_pyramid(text_encoder):
    sched = PyramidFlowMatchScheduler()
    T = 4
    targets = [torch.linspace(-1, 1, 16) * (k + 1) / T for k in range(T)]
    oracle = Oracle(targets, (16, 16), sched.stage_windows)
    vae = build_video_vae("tiny")
    pipe = M4VPipeline(oracle, vae, text_encoder, sched)  # type: ignore[arg-type]
    out = pipe("a red circle", height=128, width=128, num_frames=1 + 8 * (T - 1), num_inference_steps=3,
               video_num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    lat = out.latents
    assert lat.shape == (1, 16, T, 16, 16)
    for k in range(T):
        assert torch.allclose(lat[0, :, k], targets[k][:, None, None].expand(16, 16, 16), atol=1e-4)
    # history at the last stage of frame 3: frames 0 at 1/4, 1 at 1/2, 2 at full resolution
    last = [c for c in oracle.calls if c[0] == 3 and c[1] == 2]
    assert last and last[0][2] == [(4, 4), (8, 8), (16, 16)]
    mid = [c for c in oracle.calls if c[0] == 3 and c[1] == 1]
    assert mid[0][2] == [(4, 4), (4, 4), (8, 8)]
    # classifier-free guidance: conditional and unconditional in one batch
    assert all(c[3] == 2 for c in oracle.calls)
    # step counts: first frame 3 per stage, later frames 2 per stage
    assert sum(1 for c in oracle.calls if c[0] == 0) == 9 and sum(1 for c in oracle.calls if c[0] == 2) == 6


def run(pipe, seed, **kw):
    args = dict(height=64, width=64, num_frames=9, num_inference_steps=2, video_num_inference_steps=1)
    args.update(kw)
    return pipe("a blue square staying still on a gray background", generator=torch.Generator().manual_seed(seed),
                **args)


def test_seeds_reproduce(pipe):
    a, b, c = run(pipe, 1), run(pipe, 1), run(pipe, 2)
    assert a.frames.shape == (1, 9, 64, 64, 3) and a.frames.dtype == np.float32
    assert np.array_equal(a.frames, b.frames)
    assert not np.allclose(a.frames, c.frames)
    assert 0.0 <= a.frames.min() and a.frames.max() <= 1.0


def test_image_to_video_keeps_the_image(pipe):
    g = torch.Generator().manual_seed(0)
    img = (torch.rand(3, 64, 64, generator=g) * 2 - 1)
    out = run(pipe, 0, image=img, output_type="pt")
    first = out.frames[0, :, 0]
    # the causal VAE decodes the first frame from the first latent alone: it must equal the image's reconstruction
    recon = pipe.vae.decode(pipe.vae.encode(img[None, :, None], sample=False))[0, :, 0]
    assert torch.allclose(first, recon, atol=1e-5)
    vae_err = (recon - img).abs().mean().item()
    gen_err = (first - img).abs().mean().item()
    assert gen_err <= vae_err + 1e-5  # up to the VAE's own reconstruction error (random tiny VAE: large)
    # the text-to-video run starts from noise instead
    assert not torch.allclose(run(pipe, 0, output_type="pt").frames[0, :, 0], recon, atol=1e-3)


def test_self_quality_guidance_changes_late_frames_only(pipe):
    base = run(pipe, 3, num_frames=17, output_type="latent").latents
    sqg = run(pipe, 3, num_frames=17, output_type="latent", self_quality_guidance=0.5, sqg_start_frame=2).latents
    assert torch.equal(base[:, :, :2], sqg[:, :, :2])
    assert not torch.allclose(base[:, :, 2], sqg[:, :, 2])


def test_save_load_roundtrip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    loaded = M4VPipeline.from_pretrained(tmp_path / "model", text_encoder=pipe.text_encoder)
    assert np.array_equal(run(pipe, 5).frames, run(loaded, 5).frames)


@pytest.mark.parametrize(
    "kw,match",
    [(dict(height=48), "height: 48 is not allowed; it must be a multiple of 64"),
     (dict(num_frames=12), "nearest valid value is 9"), (dict(guidance_scale=-1.0), "guidance_scale"),
     (dict(num_inference_steps=0), "num_inference_steps"), (dict(output_type="gif"), "output_type"),
     (dict(guidance_scale=float("nan")), "guidance_scale: must be a finite number >= 0, got nan"),
     (dict(video_guidance_scale=float("inf")), "video_guidance_scale: must be a finite number"),
     (dict(guidance_scale="3"), "guidance_scale: must be a number, got '3'"),
     (dict(height=64.0), r"height: must be an integer, got 64.0 \(float\)"),
     (dict(num_inference_steps=2.5), "num_inference_steps: must be a positive integer"),
     (dict(negative_prompt=5), "negative_prompt: must be a string or a list of strings"),
     (dict(self_quality_guidance=-1.0), "self_quality_guidance: must be a finite number >= 0"),
     (dict(self_quality_guidance=0.5, sqg_start_frame=0), "sqg_start_frame: 0 is not a latent frame with history"),
     (dict(self_quality_guidance=0.5, sqg_start_frame=2), "1 to 1 for 9 frames"),
     (dict(sqg_stages=[7]), "sqg_stages: must be pyramid stages in 0..2"),
     (dict(image=np.zeros((0, 0, 3), np.uint8)), "non-empty"),
     (dict(image=np.full((8, 8, 3), 128.0)), "a float array must hold finite values in \\[0, 1\\]")],
)
def test_bad_arguments(pipe, kw, match):
    with pytest.raises(ValueError, match=match):
        run(pipe, 0, **kw)
    with pytest.raises(ValueError, match="prompt"):
        pipe("  ", height=64, width=64, num_frames=9)
    with pytest.raises(ValueError, match="prompt: must be a non-empty string"):
        pipe(5, height=64, width=64, num_frames=9)
    with pytest.raises(ValueError, match="generator: must be a torch.Generator"):
        pipe("a cat", height=64, width=64, num_frames=9, generator=0)


def test_numpy_integers_are_integers(pipe):
    """Sizes and step counts from NumPy (np.int64) are taken as the ints they are: the same video."""
    a = run(pipe, 4, num_frames=1, output_type="latent")
    b = run(pipe, 4, num_frames=np.int64(1), height=np.int64(64), width=np.int32(64), num_inference_steps=np.int64(2),
            output_type="latent")  # fmt: skip
    assert torch.equal(a.latents, b.latents)


def test_model_default_guidance_saved_loaded_and_used(pipe, tmp_path):
    """A model's own guidance (model_index.json default_guidance) is what an unset guidance argument means."""
    import json

    assert pipe.default_guidance == (7.0, 5.0)  # PyramidFlow's, for a pipeline built in code
    explicit = run(pipe, 4, guidance_scale=2.5, video_guidance_scale=1.5).frames
    assert not np.allclose(run(pipe, 4).frames, explicit)
    pipe.default_guidance = (2.5, 1.5)
    try:
        pipe.save_pretrained(tmp_path / "model")
    finally:
        pipe.default_guidance = (7.0, 5.0)
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["default_guidance"] == [2.5, 1.5]
    loaded = M4VPipeline.from_pretrained(tmp_path / "model", text_encoder=pipe.text_encoder)
    assert loaded.default_guidance == (2.5, 1.5)
    assert np.array_equal(run(loaded, 4).frames, explicit)
    # an index without the key (older models) keeps PyramidFlow's; a bad value is a one-line error
    del index["default_guidance"]
    (tmp_path / "model" / "model_index.json").write_text(json.dumps(index))
    assert M4VPipeline.from_pretrained(tmp_path / "model", text_encoder=pipe.text_encoder).default_guidance == (7, 5)
    index["default_guidance"] = [3.0, -1.0]
    (tmp_path / "model" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="default_guidance in model_index.json must be two numbers >= 0"):
        M4VPipeline.from_pretrained(tmp_path / "model", text_encoder=pipe.text_encoder)
