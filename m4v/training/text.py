"""Text conditioning for training: batching, the null (empty-prompt) text and text dropout (paper Sec. 3.1).

Classifier-free guidance needs an unconditional branch. Training replaces a dropped sample's text by
the encoding of the empty prompt ``""`` (computed once with the same frozen encoder), padded with zero
states and a False mask; the pipeline's unconditional branch encodes ``""`` too, so both agree.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from m4v.models.text_encoders import TextEmbeddings

NULL_PROMPT = ""


def pad_text(text: TextEmbeddings, length: int) -> TextEmbeddings:
    """Right-pad token states with zeros (mask False) to ``length`` tokens."""
    B, L, D = text.token_states.shape
    if length < L:
        raise ValueError(f"pad_text: cannot pad {L} tokens down to {length}.")
    if length == L:
        return text
    states = torch.cat([text.token_states, text.token_states.new_zeros(B, length - L, D)], 1)
    mask = torch.cat([text.attention_mask.bool(), text.attention_mask.new_zeros(B, length - L).bool()], 1)
    return TextEmbeddings(states, mask, text.pooled)


def stack_text(items: Sequence[tuple[Tensor, Tensor]]) -> TextEmbeddings:
    """Batch per-sample ``(token_states [L_i, D], pooled [Dp])`` (valid tokens only), zero-padded."""
    if not items:
        raise ValueError("stack_text: empty batch.")
    L = max(max(t.shape[0] for t, _ in items), 1)
    D = items[0][0].shape[1]
    states = items[0][0].new_zeros(len(items), L, D)
    mask = torch.zeros(len(items), L, dtype=torch.bool)
    for i, (t, _) in enumerate(items):
        states[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    pooled = torch.stack([p for _, p in items])
    return TextEmbeddings(states, mask, pooled)


def unbatch_text(text: TextEmbeddings) -> list[tuple[Tensor, Tensor]]:
    """Inverse of :func:`stack_text`: the valid token states and the pooled vector of each sample."""
    out = []
    for i in range(text.token_states.shape[0]):
        m = text.attention_mask[i].bool()
        out.append((text.token_states[i][m], text.pooled[i]))
    return out


def text_to(text: TextEmbeddings, device: torch.device | str, dtype: torch.dtype | None = None) -> TextEmbeddings:
    return TextEmbeddings(
        text.token_states.to(device=device, dtype=dtype or text.token_states.dtype),
        text.attention_mask.to(device=device),
        text.pooled.to(device=device, dtype=dtype or text.pooled.dtype),
    )


def apply_text_dropout(text: TextEmbeddings, null: TextEmbeddings, drop: Tensor) -> TextEmbeddings:
    """Replace the samples where ``drop [B]`` is True by the null text (states, mask and pooled).

    ``null`` is the batch-of-one encoding of ``""``; the batch is padded when the null text is longer.
    """
    drop = drop.to(text.attention_mask.device).bool()
    if not bool(drop.any()):
        return text
    L = max(text.token_states.shape[1], null.token_states.shape[1])
    text = pad_text(text, L)
    null = pad_text(text_to(null, text.token_states.device, text.token_states.dtype), L)
    d = drop[:, None]
    states = torch.where(d[..., None], null.token_states.expand_as(text.token_states), text.token_states)
    mask = torch.where(d, null.attention_mask.expand_as(text.attention_mask), text.attention_mask.bool())
    pooled = torch.where(d, null.pooled.expand_as(text.pooled), text.pooled)
    return TextEmbeddings(states, mask, pooled)


class HashTextEncoder(nn.Module):
    """Weight-free stand-in text encoder for smoke runs and tests: a fixed random vector per word.

    Token 0 is a start token (so ``""`` has one token); each word (lower-cased, split on spaces)
    gets a unit-variance Gaussian vector seeded by its CRC32 and ``seed``; pooled is the token mean.
    Not a language model: it only lets the pipeline run without downloaded weights.
    """

    def __init__(self, dim: int = 384, pooled_dim: int | None = None, max_length: int = 64, seed: int = 0) -> None:
        super().__init__()
        if dim < 1 or max_length < 1:
            raise ValueError("hash text encoder: dim and max_length must be >= 1.")
        self.token_dim = dim
        self.pooled_dim = pooled_dim or dim
        self.max_length = max_length
        self.seed = seed
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def _vector(self, word: str, dim: int) -> Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(word.encode("utf-8")) + 7919 * self.seed)
        return torch.randn(dim, generator=g)

    @torch.no_grad()
    def forward(self, prompts: str | Sequence[str]) -> TextEmbeddings:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        items = []
        for p in prompts:
            words = ["<s>"] + p.lower().split()
            words = words[: self.max_length]
            tok = torch.stack([self._vector(w, self.token_dim) for w in words])
            pooled = tok.mean(0)
            if self.pooled_dim != self.token_dim:
                pooled = torch.stack([self._vector(w, self.pooled_dim) for w in words]).mean(0)
            items.append((tok, pooled))
        return text_to(stack_text(items), self.device)

    def encode(self, prompts: str | Sequence[str]) -> TextEmbeddings:
        return self(prompts)


def load_text_encoder_spec(spec: Any) -> nn.Module:
    """``"minilm"``, ``{"t5": DIR, "clip": DIR}``, ``{"minilm": DIR}`` or ``{"hash": {dim, pooled_dim, ...}}``."""
    if isinstance(spec, dict) and "hash" in spec:
        if set(spec) != {"hash"}:
            raise ValueError("text_encoder: the 'hash' stand-in takes no other keys beside 'hash'.")
        opts = spec["hash"] or {}
        if not isinstance(opts, dict):
            raise ValueError("text_encoder.hash: must be a mapping of HashTextEncoder options.")
        return HashTextEncoder(**opts)
    from m4v.models.text_encoders import load_text_encoder

    return load_text_encoder(spec)


@torch.no_grad()
def encode_null(encoder: Any) -> TextEmbeddings:
    """The batch-of-one encoding of the empty prompt, the null text of classifier-free guidance."""
    out = encoder([NULL_PROMPT])
    return TextEmbeddings(out[0], out[1].bool(), out[2])
