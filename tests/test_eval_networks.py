"""Tests for the network metrics (m4v.eval.metrics: DINO / CLIP / aesthetic head) with tiny random models
saved locally, loaded through the same code paths as ``m4v eval vbench --clip/--dino/--aesthetic``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from m4v.eval import metrics as M
from m4v.eval.sampling import video_filename
from m4v.eval.vbench import evaluate_folder, load_encoders
from m4v.io.video import read_video, write_video

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "a", "cat", "dog", "red", "car", "in", "park", "turning"]
PROMPT = "a red car turning in park"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIPNORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _save_clip(path: Path, with_tokenizer: bool = True) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    text = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    if with_tokenizer:
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        special = [("<s>", 2), ("</s>", 3)]
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=special)
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                eos_token="</s>").save_pretrained(path)


def _save_dino(path: Path, kind: str) -> None:
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(1)
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
               patch_size=8)
    model = Dinov2Model(Dinov2Config(**cfg)) if kind == "dinov2" else ViTModel(ViTConfig(**cfg))
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    paths = {"clip": root / "clip", "clip_notok": root / "clip_notok", "dinov2": root / "dinov2", "vit": root / "vit"}
    _save_clip(paths["clip"])
    _save_clip(paths["clip_notok"], with_tokenizer=False)
    _save_dino(paths["dinov2"], "dinov2")
    _save_dino(paths["vit"], "vit")
    return paths


def _video(seed: int = 0, frames: int = 6, h: int = 24, w: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def _norm(x: torch.Tensor, stats: tuple[tuple[float, ...], tuple[float, ...]]) -> torch.Tensor:
    return (x - torch.tensor(stats[0]).view(1, 3, 1, 1)) / torch.tensor(stats[1]).view(1, 3, 1, 1)


def _ref_dino(path: Path, video: np.ndarray) -> torch.Tensor:
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    x = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(224, 224 * video.shape[2] // video.shape[1]), mode="bilinear", align_corners=False)
    kwargs = {"interpolate_pos_encoding": True} if isinstance(model, transformers.ViTModel) else {}
    with torch.no_grad():
        cls = model(pixel_values=_norm(x, IMAGENET), **kwargs).last_hidden_state[:, 0]
    return F.normalize(cls, dim=-1)


def _ref_clip_images(path: Path, video: np.ndarray) -> torch.Tensor:
    model = transformers.CLIPModel.from_pretrained(path, local_files_only=True).eval()
    x = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(32, 32 * video.shape[2] // video.shape[1]), mode="bicubic", align_corners=False,
                      antialias=True)
    left = (x.shape[-1] - 32) // 2
    x = x[..., :, left : left + 32]
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=_norm(x, CLIPNORM)).pooler_output)
    return F.normalize(emb, dim=-1)


def _ref_clip_text(path: Path, prompt: str) -> torch.Tensor:
    model = transformers.CLIPModel.from_pretrained(path, local_files_only=True).eval()
    ids = torch.tensor([[2] + [WORDS.index(w) for w in prompt.split()] + [3]])
    with torch.no_grad():
        out = model.text_model(input_ids=ids)
        emb = model.text_projection(out.last_hidden_state[0, -1])  # the EOS token is last
    return F.normalize(emb, dim=-1)


def _loop_consistency(f: torch.Tensor) -> np.ndarray:
    f = f.double()
    return np.array([(max(0.0, float(f[i - 1] @ f[i])) + max(0.0, float(f[0] @ f[i]))) / 2 for i in range(1, len(f))])


@pytest.mark.parametrize("kind", ["dinov2", "vit"])
def test_dino_features_and_subject_consistency(models: dict[str, Path], kind: str) -> None:
    video = _video()
    enc = M.DinoEncoder(models[kind])
    ref = _ref_dino(models[kind], video)
    assert torch.allclose(enc.features(video), ref, atol=1e-5)
    np.testing.assert_allclose(M.subject_consistency(video, enc), _loop_consistency(ref), atol=1e-5)
    assert np.allclose(M.subject_consistency(np.repeat(video[:1], 4, 0), enc), 1.0)


def test_clip_features_background_and_overall(models: dict[str, Path]) -> None:
    video = _video(1, frames=17)
    enc = M.ClipEncoder(models["clip"])
    ref = _ref_clip_images(models["clip"], video)
    assert torch.allclose(enc.image_features(video), ref, atol=1e-5)
    np.testing.assert_allclose(M.background_consistency(video, enc), _loop_consistency(ref), atol=1e-5)
    text = _ref_clip_text(models["clip"], PROMPT)
    assert torch.allclose(enc.text_features(PROMPT), text, atol=1e-5)
    mid = F.normalize(ref[[0, 2, 4, 6, 8, 10, 12, 15]].mean(0), dim=-1)
    assert M.overall_consistency(video, PROMPT, enc) == pytest.approx(float(mid @ text), abs=1e-5)


def test_aesthetic_heads(models: dict[str, Path], tmp_path: Path) -> None:
    enc = M.ClipEncoder(models["clip"])
    video = _video(2)
    emb = enc.image_features(video).double()
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 1).double()
    save_file({"weight": linear.weight.float().contiguous(), "bias": linear.bias.float()}, tmp_path / "lin.safetensors")
    head = M.AestheticHead(tmp_path / "lin.safetensors")
    expect = (linear(emb.float().double())[:, 0] / 10).mean().item()
    assert M.aesthetic_quality(video, enc, head) == pytest.approx(expect, abs=1e-5)
    # an MLP whose layer numbers sort differently as text ("layers.10" < "layers.2") and as numbers
    mlp = torch.nn.ModuleDict({"0": torch.nn.Linear(16, 8), "2": torch.nn.Linear(8, 4), "10": torch.nn.Linear(4, 1)})
    state = {f"layers.{k}.{n}": p.detach().contiguous() for k, m in mlp.items() for n, p in m.named_parameters()}
    save_file(state, tmp_path / "mlp.safetensors")
    ref = mlp["10"](mlp["2"](mlp["0"](emb.float())))[:, 0].double()
    torch.testing.assert_close(M.AestheticHead(tmp_path / "mlp.safetensors")(emb), ref, atol=1e-5, rtol=1e-5)


def test_loading_errors(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--clip"):
        M.ClipEncoder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--dino"):
        M.DinoEncoder(models["clip"])  # a CLIP folder is not a ViT/DINO model
    with pytest.raises(ValueError, match="--clip: .*'dinov2' is not a CLIP model"):
        M.ClipEncoder(models["dinov2"])  # would otherwise load as a randomly initialised CLIP
    with pytest.raises(ValueError, match="needs --clip"):
        load_encoders(aesthetic_path=tmp_path / "x.safetensors")
    save_file({"weight": torch.zeros(1, 7)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="7-d"):
        load_encoders(clip_dir=models["clip"], aesthetic_path=tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        load_encoders(clip_dir=models["clip"], aesthetic_path=tmp_path / "none.safetensors")
    enc = M.ClipEncoder(models["clip_notok"])
    assert enc.tokenizer is None
    with pytest.raises(ValueError, match="tokenizer"):
        enc.text_features(PROMPT)


def test_evaluate_folder_with_networks(models: dict[str, Path], tmp_path: Path) -> None:
    save_file({"weight": torch.full((1, 16), 0.5), "bias": torch.tensor([5.0])}, tmp_path / "aes.safetensors")
    folder = tmp_path / "videos"
    for i in range(2):
        write_video(folder / video_filename(PROMPT, i), _video(10 + i, frames=9, h=32, w=32), fps=8)
    report = evaluate_folder(folder, clip_dir=models["clip"], dino_dir=models["dinov2"],
                             aesthetic_path=tmp_path / "aes.safetensors", aesthetic_clip_dir=models["clip"],
                             progress=False)
    dims = report["dimensions"]
    assert dims["subject_consistency"]["metric"] == "subject_consistency_dino"
    assert dims["background_consistency"]["metric"] == "background_consistency_clip"
    assert "subject_consistency_proxy" in report["metrics"]  # the proxy is still reported alongside
    videos = [read_video(folder / video_filename(PROMPT, i)) for i in range(2)]
    clip = M.ClipEncoder(models["clip"])
    overall = np.mean([M.overall_consistency(v, PROMPT, clip) for v in videos])
    assert dims["overall_consistency"]["value"] == pytest.approx(overall, abs=1e-6)
    aes = np.mean([(0.5 * clip.image_features(v).sum(1) + 5.0).mean().item() / 10 for v in videos])
    assert dims["aesthetic_quality"]["value"] == pytest.approx(aes, abs=1e-6)
    subj = np.concatenate([M.subject_consistency(v, M.DinoEncoder(models["dinov2"])) for v in videos]).mean()
    assert dims["subject_consistency"]["value"] == pytest.approx(subj, abs=1e-6)
    report2 = evaluate_folder(folder, clip_dir=models["clip_notok"], progress=False)
    assert "overall_consistency" not in report2["dimensions"] and "tokenizer" in report2["warnings"][0]
