"""Tests for the frozen text encoders (m4v.models.text_encoders): MiniLM (real weights) and tiny T5 + CLIP."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from m4v.models.text_encoders import (
    MiniLMTextEncoder,
    PromptTruncatedWarning,
    T5CLIPTextEncoder,
    TextEmbeddings,
    load_text_encoder,
)

WORDS = "a cat dog runs on the beach at sunset red blue small big sky".split()
PROMPTS = ["a cat", "a big red dog runs on the beach at sunset", "blue sky"]


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    enc = load_text_encoder("minilm")
    assert isinstance(enc, MiniLMTextEncoder)
    return enc


def _word_tokenizer(specials: list[str], single: str, **tokens: str) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    names = [s for s in specials if s in single]
    tk.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(s, vocab[s]) for s in names])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", **tokens)


def _save_t5(path: Path) -> None:
    tok = _word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>")
    tok.save_pretrained(path)
    cfg = T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    T5EncoderModel(cfg).save_pretrained(path)


def _clip_tokenizer() -> PreTrainedTokenizerFast:
    return _word_tokenizer(
        ["<|endoftext|>", "<|startoftext|>", "<unk>"],
        "<|startoftext|> $A <|endoftext|>",
        pad_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        bos_token="<|startoftext|>",
    )


def _clip_text_config(vocab: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=12, projection_dim=24, eos_token_id=0, bos_token_id=1, pad_token_id=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def t5_clip_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("enc")
    _save_t5(root / "t5")
    tok = _clip_tokenizer()
    torch.manual_seed(1)
    tok.save_pretrained(root / "clip")
    CLIPTextModelWithProjection(_clip_text_config(len(tok))).save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip_plain")
    CLIPTextModel(_clip_text_config(len(tok))).save_pretrained(root / "clip_plain")
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=8, patch_size=4)  # fmt: skip
    full = CLIPConfig(text_config=_clip_text_config(len(tok)).to_dict(), vision_config=vision, projection_dim=24)
    tok.save_pretrained(root / "clip_full")
    CLIPModel(full).save_pretrained(root / "clip_full")
    return {
        "t5": root / "t5",
        "clip": root / "clip",
        "clip_plain": root / "clip_plain",
        "clip_full": root / "clip_full",
    }


# ----------------------------------------------------------------------------------------------- MiniLM
def test_minilm_shapes_mask_and_pooling(minilm: MiniLMTextEncoder) -> None:
    assert (minilm.token_dim, minilm.pooled_dim, minilm.max_length) == (384, 384, 128)
    out = minilm(PROMPTS)
    assert isinstance(out, TextEmbeddings)
    lengths = [len(minilm.tokenizer(p)["input_ids"]) for p in PROMPTS]
    b, length, d = out.token_states.shape
    assert (b, length, d) == (3, max(lengths), 384)  # padded to the longest prompt, not to max_length
    assert out.attention_mask.dtype == torch.bool
    assert out.attention_mask.sum(1).tolist() == lengths
    assert out.pooled.shape == (3, 384)
    for i, p in enumerate(PROMPTS):  # each prompt alone (no padding): same valid states, pooled = their mean
        alone = minilm(p)
        n = lengths[i]
        torch.testing.assert_close(out.token_states[i, :n], alone.token_states[0], rtol=1e-4, atol=1e-4)
        ref = alone.token_states[0].double().mean(0).float()
        torch.testing.assert_close(out.pooled[i], ref, rtol=1e-4, atol=1e-4)


def test_minilm_truncation_warning(minilm: MiniLMTextEncoder) -> None:
    with pytest.warns(PromptTruncatedWarning, match="prompt 1 has .* truncated to max_length=128"):
        out = minilm(["a cat", "word " * 300])
    assert out.token_states.shape[1] == 128
    assert bool(out.attention_mask[1].all())
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        minilm(PROMPTS)


def test_minilm_deterministic_frozen_and_dtype(minilm: MiniLMTextEncoder) -> None:
    a, b = minilm(PROMPTS), minilm(PROMPTS)
    assert torch.equal(a.token_states, b.token_states) and torch.equal(a.pooled, b.pooled)
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.model.training
    assert a.token_states.grad_fn is None
    enc64 = MiniLMTextEncoder().to(dtype=torch.float64)
    c = enc64(PROMPTS)
    assert c.token_states.dtype == torch.float64
    torch.testing.assert_close(c.pooled.float(), a.pooled, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- T5 + CLIP
def test_t5_clip_matches_direct_models(t5_clip_dirs: dict[str, Path]) -> None:
    enc = load_text_encoder({"t5": str(t5_clip_dirs["t5"]), "clip": str(t5_clip_dirs["clip"])})
    assert isinstance(enc, T5CLIPTextEncoder)
    assert (enc.token_dim, enc.pooled_dim) == (32, 24)
    out = enc(PROMPTS)
    t5 = T5EncoderModel.from_pretrained(t5_clip_dirs["t5"]).eval()
    clip = CLIPTextModelWithProjection.from_pretrained(t5_clip_dirs["clip"]).eval()
    vocab = enc.t5_tokenizer.get_vocab()
    cvocab = enc.clip_tokenizer.get_vocab()
    assert out.token_states.shape == (3, 11, 32)  # longest prompt: 10 words + </s>
    for i, p in enumerate(PROMPTS):  # each prompt alone, ids built by hand
        ids = torch.tensor([[vocab[w] for w in p.split()] + [vocab["</s>"]]])
        n = ids.shape[1]
        with torch.no_grad():
            ref = t5(input_ids=ids).last_hidden_state[0]
            cids = torch.tensor([[cvocab["<|startoftext|>"]] + [cvocab[w] for w in p.split()] + [0]])
            pooled = clip(input_ids=cids).text_embeds[0]
        assert out.attention_mask[i].sum() == n and bool(out.attention_mask[i, :n].all())
        torch.testing.assert_close(out.token_states[i, :n], ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.pooled[i], pooled, rtol=1e-4, atol=1e-5)


def test_t5_clip_truncation(t5_clip_dirs: dict[str, Path]) -> None:
    enc = T5CLIPTextEncoder(t5_clip_dirs["t5"], t5_clip_dirs["clip"], max_length=6)
    with pytest.warns(PromptTruncatedWarning) as record:
        out = enc(["a big red dog runs on the beach"])
    messages = " ".join(str(r.message) for r in record)
    assert "T5: prompt 0 has 9 tokens" in messages and "CLIP: prompt 0 has 10 tokens" not in messages
    assert out.token_states.shape == (1, 6, 32)
    enc.max_length = 128
    with pytest.warns(PromptTruncatedWarning, match="CLIP: prompt 0 has 14 tokens .* max_length=12"):
        enc(["a cat " * 6])


def test_clip_without_projection_and_full_clip(t5_clip_dirs: dict[str, Path]) -> None:
    plain = T5CLIPTextEncoder(t5_clip_dirs["t5"], t5_clip_dirs["clip_plain"])
    assert not plain.clip_projected and plain.pooled_dim == 32
    ref_model = CLIPTextModel.from_pretrained(t5_clip_dirs["clip_plain"]).eval()
    ids = plain.clip_tokenizer(["a cat"], return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(**ids).pooler_output
    torch.testing.assert_close(plain("a cat").pooled, ref)
    full = T5CLIPTextEncoder(t5_clip_dirs["t5"], t5_clip_dirs["clip_full"])
    assert full.clip_projected and full.pooled_dim == 24
    full_ref = CLIPModel.from_pretrained(t5_clip_dirs["clip_full"]).eval()
    with torch.no_grad():
        ref = full_ref.get_text_features(**ids)
    ref = getattr(ref, "pooler_output", ref)
    torch.testing.assert_close(full("a cat").pooled, ref)


def test_loader_errors(tmp_path: Path, t5_clip_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unknown"):
        load_text_encoder("t5")
    with pytest.raises(ValueError, match="keys"):
        load_text_encoder({"t5": str(t5_clip_dirs["t5"])})
    with pytest.raises(ValueError, match="does not exist"):
        load_text_encoder({"t5": str(tmp_path / "nope"), "clip": str(t5_clip_dirs["clip"])})
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no config.json"):
        load_text_encoder({"t5": str(t5_clip_dirs["t5"]), "clip": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="prompts"):
        load_text_encoder({"t5": str(t5_clip_dirs["t5"]), "clip": str(t5_clip_dirs["clip"])})([])
