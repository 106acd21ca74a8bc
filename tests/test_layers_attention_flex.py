"""FlexAttention backend of the temporal-causal joint attention (paper Sec. 3.1) against the dense-mask SDPA path."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

from m4v.layers.attention import (
    attention,
    attention_backend,
    frame_causal_block_mask,
    frame_causal_mask,
    frame_causal_mask_mod,
)
from m4v.models.blocks import SequenceContext

SIZES = [(2, 2), (2, 2), (4, 4)]
TEXT = 5


def layout(sizes=SIZES, text=TEXT, lengths=(TEXT, 2)):
    """Frame ids [N] (text = -1) and key validity [B, N] (padded text keys False), as SequenceContext builds them."""
    ids = torch.cat([torch.full((text,), -1)] + [torch.full((h * w,), f) for f, (h, w) in enumerate(sizes)])
    text_mask = torch.arange(text)[None] < torch.tensor(lengths)[:, None]
    valid = torch.cat([text_mask, torch.ones(len(lengths), ids.numel() - text, dtype=torch.bool)], 1)
    return ids, valid


def qkv(B, N, heads=2, d=8, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, heads, N, d, generator=g, dtype=dtype).to(device) for _ in range(3)]


@pytest.mark.parametrize("block", [4, 8, 128])
@pytest.mark.parametrize("padded", [False, True])
def test_block_mask_matches_torch_create_block_mask(block, padded):
    """Our per-block bounds give the same kept and full tiles as torch's dense create_block_mask."""
    ids, valid = layout()
    valid = valid if padded else None
    ours = frame_causal_block_mask(ids, valid, block_size=block)
    mod = frame_causal_mask_mod(ids, valid)
    B, N = (1 if valid is None else valid.shape[0]), ids.numel()
    ref = create_block_mask(mod, B, None, N, N, device="cpu", BLOCK_SIZE=block)
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    dense = frame_causal_mask(ids, valid)
    assert torch.equal(create_mask(mod, B, 1, N, N, device="cpu"), dense.expand(B, 1, N, N))


def test_block_mask_exact_for_unsorted_ids_and_scattered_padding():
    """The tile bounds hold for any frame-id order and any key-validity pattern (only sparsity needs sorted ids)."""
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        ids = torch.randint(-1, 4, (45,), generator=g)
        valid = torch.rand(3, 45, generator=g) > 0.3
        ours = frame_causal_block_mask(ids, valid, block_size=8)
        ref = create_block_mask(frame_causal_mask_mod(ids, valid), 3, None, 45, 45, device="cpu", BLOCK_SIZE=8)
        assert torch.equal(ours.to_dense(), ref.to_dense())
        assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)


@pytest.mark.parametrize("block", [4, 128])
@pytest.mark.parametrize("padded", [False, True])
def test_flex_matches_dense_sdpa_outputs_and_gradients(block, padded):
    ids, valid = layout()
    valid = valid if padded else None
    q, k, v = qkv(2, ids.numel())
    dense, sparse = frame_causal_mask(ids, valid), frame_causal_block_mask(ids, valid, block_size=block)
    with torch.no_grad():  # the FlexAttention kernel itself (eager on CPU: it has no CPU backward)
        assert torch.allclose(attention(q, k, v, sparse), attention(q, k, v, dense), atol=1e-12)
    grads = []
    for mask in (dense, sparse):  # off CUDA the BlockMask path differentiates its mask_mod densely
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = attention(*leaves, mask)
        out.mul(torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        grads.append((out.detach(), *(t.grad for t in leaves)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12)


def test_padded_text_query_row_attends_to_valid_text_and_itself():
    ids, valid = layout(lengths=(TEXT, 2, 0))
    q, k, v = qkv(3, ids.numel())
    with torch.no_grad():
        out = attention(q, k, v, frame_causal_block_mask(ids, valid)).unflatten(-1, (2, -1)).transpose(1, 2)
    assert torch.isfinite(out).all()
    # a prompt with no real token: its padded text rows see only themselves
    assert torch.allclose(out[2, :, :TEXT], v[2, :, :TEXT], atol=1e-12)
    # batch element 1, padded row 3: softmax over the two valid text keys and itself, by hand
    keys = [0, 1, 3]
    w = torch.softmax(q[1, :, 3:4] @ k[1, :, keys].transpose(-1, -2) / 8**0.5, -1)
    assert torch.allclose(out[1, :, 3], (w @ v[1, :, keys])[:, 0], atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention (and its backward) needs CUDA")
def test_flex_compiled_cuda_matches_dense_sdpa():
    ids, valid = layout(sizes=[(8, 8), (8, 8), (16, 16)], text=40, lengths=(40, 11))
    ids, valid = ids.cuda(), valid.cuda()
    q, k, v = (t.float().requires_grad_(True) for t in qkv(2, ids.numel(), heads=4, d=64, device="cuda"))
    outs = []
    for mask in (frame_causal_mask(ids, valid), frame_causal_block_mask(ids, valid)):
        out = attention(q, k, v, mask)
        (gq, gk, gv) = torch.autograd.grad(out.square().sum(), (q, k, v))
        outs.append((out, gq, gk, gv))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=2e-3, rtol=2e-3), (a - b).abs().max()


def test_backend_choice_from_environment(monkeypatch):
    ids, valid = layout()
    text_mask = valid[:, :TEXT]
    monkeypatch.delenv("M4V_ATTENTION", raising=False)
    assert attention_backend() == "sdpa"
    assert isinstance(SequenceContext(text_mask, SIZES, (2, 3, 3), 1e4).attn_mask, torch.Tensor)
    monkeypatch.setenv("M4V_ATTENTION", "flex")
    ctx = SequenceContext(text_mask, SIZES, (2, 3, 3), 1e4)
    assert isinstance(ctx.attn_mask, BlockMask) and ctx.attn_mask is ctx.attn_mask  # built once, cached
    assert SequenceContext(text_mask, SIZES, (2, 3, 3), 1e4, attention="sdpa").attention == "sdpa"
    # nothing masked (one frame, no padding): plain SDPA without a mask on both backends
    assert SequenceContext(torch.ones(2, TEXT, dtype=torch.bool), SIZES[:1], (2, 3, 3), 1e4).attn_mask is None
    monkeypatch.setenv("M4V_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match="M4V_ATTENTION"):
        SequenceContext(text_mask, SIZES, (2, 3, 3), 1e4)
    with pytest.raises(ValueError, match="M4V_ATTENTION"):
        attention_backend("Flex")


def model_inputs(B=2, L=7, lengths=(7, 3), cur=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    C, D = 16, 384
    hist = [torch.randn(B, C, cur // 2, cur // 2, generator=g), torch.randn(B, C, cur, cur, generator=g)]
    return dict(
        hidden_states=torch.randn(B, C, cur, cur, generator=g),
        timestep=torch.tensor([700.0, 250.0]),
        encoder_hidden_states=torch.randn(B, L, D, generator=g),
        pooled_projections=torch.randn(B, D, generator=g),
        encoder_attention_mask=torch.arange(L)[None] < torch.tensor(lengths)[:, None],
        history=hist,
    )


@pytest.mark.parametrize("layout_name", ["full_attn", "full_temp"])
def test_transformer_flex_matches_sdpa(layout_name, monkeypatch):
    """float32: float64 would put the MM-DiM depthwise conv on torch's slow CPU path (~10 s a forward)."""
    model = tiny_model(layout=layout_name)
    kw = model_inputs()
    outs = {}
    for backend in ("sdpa", "flex"):
        monkeypatch.setenv("M4V_ATTENTION", backend)
        with torch.no_grad():
            outs[backend] = model(**kw).sample
    assert torch.isfinite(outs["sdpa"]).all()
    assert torch.allclose(outs["flex"], outs["sdpa"], atol=5e-6, rtol=0)  # measured ~4e-7 on outputs of ~1.5
    # a sanity check that the mask matters here: dropping it changes the output
    monkeypatch.setenv("M4V_ATTENTION", "sdpa")
    with torch.no_grad():
        unmasked = model(**dict(kw, encoder_attention_mask=None)).sample
    assert not torch.allclose(unmasked, outs["sdpa"], atol=1e-6)


def test_attention_without_mask_is_plain_sdpa():
    q, k, v = qkv(2, 9)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    assert torch.equal(attention(q, k, v, None), ref)
