"""Small builders for tests and CPU smoke runs: tiny training configs and a tiny local CLIP folder.

Nothing here downloads anything: the CLIP model is randomly initialised and its tokenizer is a
word-level ``tokenizers`` vocabulary saved beside it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from m4v.training.config import TrainConfig, from_dict, validate

TINY_WORDS = (
    "a big small red green blue yellow purple orange cyan white circle square triangle moving to the left "
    "right up down staying still and on black gray background"
).split()


def tiny_config_dict(output_dir: str | Path, **sections: Any) -> dict[str, Any]:
    """A tiny-model config on Moving Shapes at 64x64 with the weight-free hash text encoder and tiny VAE."""
    base: dict[str, Any] = {
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"config": "tiny"},
        "text_encoder": {"hash": {"dim": 384}},
        "vae": "tiny",
        "data": {"source": "moving_shapes", "moving_shapes": {"num_samples": 8}},
        "optim": {"lr": 1e-3},
        "checkpoint": {"every": 1000, "export_final": False, "resume": "none"},
        "logging": {"every": 1, "progress": False, "tensorboard": False},
        "stages": [{"steps": 2, "height": 64, "width": 64, "num_frames": 9, "image_ratio": 0.0, "batch_size": 2}],
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merged = copy.deepcopy(base[k])
            merged.update(v)
            base[k] = merged
        else:
            base[k] = v
    return base


def tiny_config(output_dir: str | Path, **sections: Any) -> TrainConfig:
    return validate(from_dict(TrainConfig, tiny_config_dict(output_dir, **sections), ""))


def make_tiny_clip(folder: str | Path, image_size: int = 32, projection_dim: int = 16, seed: int = 0) -> Path:
    """Save a randomly initialised tiny ``CLIPModel`` and a word-level tokenizer to ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    folder = Path(folder)
    vocab: dict[str, int] = {"[PAD]": 0, "[UNK]": 1}
    for w in TINY_WORDS:
        vocab.setdefault(w, len(vocab))
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos] = len(vocab)
    vocab[eos] = len(vocab)  # highest id, as in CLIP
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="[PAD]", unk_token="[UNK]"
    )
    fast.save_pretrained(folder)
    text = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, bos_token_id=vocab[bos], eos_token_id=vocab[eos], pad_token_id=0,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=image_size, patch_size=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    model.save_pretrained(folder)
    return folder
