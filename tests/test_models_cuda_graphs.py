"""CUDA graphs for generation (m4v.models.cuda_graphs): prebuilt token layout (CPU), replay vs eager (GPU)."""

import pytest
import torch
from conftest import randomize_, tiny_model
from test_models_transformer import inputs

from m4v.models import M4VTransformer, named_config
from m4v.models.cuda_graphs import CUDAGraphTransformer, cuda_graphs_enabled
from m4v.models.text_encoders import load_text_encoder
from m4v.models.vae import build_video_vae
from m4v.pipelines import M4VPipeline
from m4v.schedulers import PyramidFlowMatchScheduler

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("layout", ["full_temp", "full_attn"])
def test_prebuilt_context_gives_the_same_output(layout):
    model = tiny_model(layout=layout).double()
    kw = inputs(dtype=torch.float64)
    ctx = model.sequence_context(model.token_grids(kw["hidden_states"], kw["history"]), kw["encoder_attention_mask"])
    torch.testing.assert_close(model(**kw, context=ctx).sample, model(**kw).sample, rtol=0, atol=0)
    # the same context serves a second forward with other values of the same shapes
    kw2 = inputs(dtype=torch.float64, seed=1)
    torch.testing.assert_close(model(**kw2, context=ctx).sample, model(**kw2).sample, rtol=0, atol=0)


def test_context_of_other_shapes_is_refused():
    model = tiny_model(layout="full_temp")
    kw = inputs()
    ctx = model.sequence_context(model.token_grids(kw["hidden_states"]), kw["encoder_attention_mask"])
    with pytest.raises(ValueError, match="^context: built for token grids"):
        model(**kw, context=ctx)


def test_cpu_model_does_not_use_graphs():
    model = tiny_model(layout="full_temp")
    assert cuda_graphs_enabled(None, model) is False
    assert cuda_graphs_enabled(False, model) is False
    with pytest.raises(ValueError, match="^cuda_graphs: needs"):
        cuda_graphs_enabled(True, model)
    kw = inputs()
    with pytest.raises(ValueError, match="^cuda_graphs: needs"):
        CUDAGraphTransformer(model, kw["encoder_hidden_states"], kw["pooled_projections"], kw["encoder_attention_mask"])


def _pyramid_calls(B, seed=0, size=16, device="cuda", dtype=torch.float32):
    """Inputs of a short generation: two frames x three stages x two steps, then a repeat of the first shape."""
    g = torch.Generator().manual_seed(seed)
    calls, clean = [], []
    for _frame in range(2):
        for stage in range(3):
            hw = size >> (2 - stage)
            hist = [F.to(device, dtype) for F in clean] if stage == 2 else [
                torch.nn.functional.avg_pool2d(F, 1 << (2 - stage)).to(device, dtype) for F in clean]
            for _ in range(2):
                x = torch.randn(B, 16, hw, hw, generator=g).to(device, dtype)
                t = torch.rand(B, generator=g).mul(1000).to(device)
                calls.append((x, t, hist))
        clean.append(torch.randn(B, 16, size, size, generator=g))
    x = torch.randn(B, 16, size // 4, size // 4, generator=g).to(device, dtype)
    calls.append((x, torch.rand(B, generator=g).mul(1000).to(device), []))
    return calls


@cuda
@pytest.mark.parametrize("layout", ["full_temp", "full_attn"])
def test_graph_replay_matches_eager(layout):
    """Every call (first of a shape: eager + capture; later: replay with new inputs) equals the eager forward."""
    torch.manual_seed(0)
    model = tiny_model(layout=layout).cuda().eval()
    kw = inputs()
    txt, pooled = kw["encoder_hidden_states"].cuda(), kw["pooled_projections"].cuda()
    mask = kw["encoder_attention_mask"].cuda()
    graphed = CUDAGraphTransformer(model, txt, pooled, mask, max_graphs=2)
    outs, refs = [], []
    with torch.no_grad():
        for x, t, hist in _pyramid_calls(2):
            outs.append(graphed(x, t, hist))
            refs.append(model(x, t, txt, pooled, mask, history=hist).sample)
    # the replayed outputs are copies: a later replay does not overwrite an earlier result
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
        assert o.abs().max() > 0
    assert graphed.num_captures == 7  # six shapes, the last one evicted before it came back (at most 2 kept)
    assert len(graphed.graphs) == 2


@cuda
def test_shapes_over_the_token_limit_run_eagerly():
    model = tiny_model(layout="full_temp").cuda().eval()
    kw = inputs()
    txt, pooled = kw["encoder_hidden_states"].cuda(), kw["pooled_projections"].cuda()
    mask = kw["encoder_attention_mask"].cuda()
    calls = _pyramid_calls(2)[:6]  # first frame: 4, 16 and 64 video tokens (patch 2), 7 text tokens
    graphed = CUDAGraphTransformer(model, txt, pooled, mask, max_tokens=7 + 16)
    with torch.no_grad():
        for x, t, hist in calls:
            torch.testing.assert_close(graphed(x, t, hist), model(x, t, txt, pooled, mask, history=hist).sample,
                                       rtol=1e-5, atol=1e-5)
    assert graphed.num_captures == 2 and [graphed.uses_graph(x, h) for x, _, h in calls[::2]] == [True, True, False]


@cuda
def test_pipeline_with_and_without_graphs():
    torch.manual_seed(0)
    pipe = M4VPipeline(randomize_(M4VTransformer(**named_config("tiny"))), build_video_vae("tiny"),
                       load_text_encoder("minilm"), PyramidFlowMatchScheduler()).to("cuda")
    args = dict(height=64, width=64, num_frames=17, num_inference_steps=3, video_num_inference_steps=2,
                output_type="latent", self_quality_guidance=0.5, sqg_start_frame=1)

    def run(graphs):
        return pipe("a red circle moving to the right", generator=torch.Generator().manual_seed(3),
                    cuda_graphs=graphs, **args).latents

    torch.testing.assert_close(run(True), run(False), rtol=1e-4, atol=1e-4)
