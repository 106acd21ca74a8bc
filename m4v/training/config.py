"""Training configuration: the YAML schema of ``m4v train`` with the progressive stages of paper D.1.

A config is a tree of dataclasses built from a YAML mapping by :func:`from_dict`. Unknown keys and
values of the wrong type raise ``ValueError`` naming the dotted field (``stages[1].height: ...``).
Numbers written like ``1e-4`` (a string to YAML 1.1) are accepted for float fields.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("constant", "cosine")
CORRUPTIONS = ("linear", "constant", "none")
# Latent grid divisibility: 8x VAE, 2 pyramid halvings, patch 2 => pixels divisible by 8 * 4 * 2 (32 at patch 1).
PIXEL_MULTIPLE = 64
FAMILIES = ("pyramidflow", "wan")
# M4V (Wan2.1), Sec. 4.1: Wan's VAE (8x space, 4x time) and patch 2, no pyramid => pixels divisible by 16.
WAN_PIXEL_MULTIPLE = 16
WAN_TEMPORAL = 4
PYRAMID_TEMPORAL = 8


@dataclass
class ModelConfig:
    """Which transformer to train: a named config (+ overrides) or a ``save_pretrained`` folder.

    ``family``: ``pyramidflow`` (M4VTransformer, pyramidal flow matching) or ``wan`` (M4VWanTransformer,
    full-sequence flow matching on the whole video latent, paper Sec. 4.1).
    """

    family: str = "pyramidflow"
    config: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None


@dataclass
class MovingShapesConfig:
    """Parameters of the synthetic Moving Shapes source (``m4v.data.MovingShapes``)."""

    num_samples: int = 1000
    seed: int = 0
    split: str = "train"
    max_objects: int = 2
    paraphrase_prob: float = 0.0


@dataclass
class DataConfig:
    """Data source: ``moving_shapes``, a folder / .csv / .jsonl of videos, or a ``m4v prepare`` shard folder."""

    source: str = "moving_shapes"
    moving_shapes: MovingShapesConfig = field(default_factory=MovingShapesConfig)
    root: str | None = None
    frame_stride: int | None = None
    num_workers: int = 0
    prefetch_factor: int = 2
    vae_sample: bool = False


@dataclass
class ObjectiveConfig:
    """Pyramidal flow matching with the temporal pyramid (Sec. 3.1, A.3)."""

    stage_weights: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])
    corruption: str = "linear"
    corruption_eta: float = 1.0 / 3.0
    text_dropout: float = 0.1
    scheduler: dict[str, Any] = field(default_factory=dict)
    shift: float | None = None  # wan family only: Wan's sigma shift (null: 3.0 up to 832x480 pixels, else 5.0)


@dataclass
class OptimConfig:
    """AdamW (betas 0.9, 0.95), gradient clipping, warm-up then constant or cosine learning rate."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0


@dataclass
class EMAConfig:
    """Exponential moving average of the weights, kept in float32."""

    enabled: bool = True
    decay: float = 0.9999
    start_step: int = 0


@dataclass
class RewardConfig:
    """Reward learning (Sec. 3.4, D.1): CLIP text-image score and an aesthetic head, from local folders."""

    clip_dir: str | None = None
    aesthetic_dir: str | None = None
    aesthetic_clip_dir: str | None = None
    weight: float = 0.1
    clip_weight: float = 1.0
    aesthetic_weight: float = 1.0
    frame_window: int = 8
    decode_context: int = 1
    num_pixel_frames: int = 1
    stages: list[int] = field(default_factory=lambda: [0, 1, 2])
    decoder_checkpointing: bool = False


@dataclass
class StageConfig:
    """One phase of the progressive schedule (D.1): resolution, clip length, image ratio, batch, lr."""

    steps: int
    height: int
    width: int
    num_frames: int = 1
    image_ratio: float | None = None
    batch_size: int = 8
    image_batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    frame_window: int | None = None
    reward: bool = False
    name: str | None = None


@dataclass
class RunConfig:
    """Precision, memory and speed switches of the training loop."""

    precision: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    grad_accum: int = 1
    fsdp_reshard_after_forward: bool = True


@dataclass
class CheckpointConfig:
    """Where and how often to write torch.distributed.checkpoint snapshots, and what to resume from."""

    every: int = 1000
    keep: int = 2
    resume: str = "auto"
    export_final: bool = True


@dataclass
class LoggingConfig:
    """CSV / TensorBoard logging and the rank-0 progress bar."""

    every: int = 10
    tensorboard: bool = True
    progress: bool = True


class StageSchedule:
    """Step bookkeeping shared by the transformer and VAE configs (both have ``stages``)."""

    stages: list[StageConfig]

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> tuple[int, int]:
        """(stage index, step within that stage) of optimizer step ``step``."""
        start = 0
        for i, s in enumerate(self.stages):
            if step < start + s.steps:
                return i, step - start
            start += s.steps
        raise ValueError(f"step {step} is past the end of the schedule ({self.total_steps} steps).")

    def stage_start(self, index: int) -> int:
        return sum(s.steps for s in self.stages[:index])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(StageSchedule):
    """Everything ``m4v train`` needs (see docs/training.md for the YAML schema)."""

    stages: list[StageConfig]
    seed: int = 0
    output_dir: str = "runs/m4v"
    model: ModelConfig = field(default_factory=ModelConfig)
    text_encoder: Any = "minilm"
    vae: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    reward: RewardConfig | None = None
    train: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)



# ------------------------------------------------------------------------------------------ builder
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` against the annotation ``tp``; raise ValueError naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{where}: must not be null.")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} has the wrong type.")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: must be a list, got {type(value).__name__}.")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: must be a mapping, got {type(value).__name__}.")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: must be an integer, got {value!r}.")
        return value
    if tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ValueError(f"{where}: must be a number, got {value!r}.")
        if not math.isfinite(number):
            raise ValueError(f"{where}: must be a finite number, got {value!r}.")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: must be a string, got {value!r}.")
        return value
    raise ValueError(f"{where}: unsupported field type {_type_name(tp)}.")


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys and bad types raise ValueError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: must be a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        place = f"{where}: unknown key" if where else "unknown top-level key"
        raise ValueError(f"{place} {unknown[0]!r}; allowed keys are {', '.join(fields)}.")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{sub}: missing required key.")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------- validation
def _positive(value: float, where: str) -> None:
    if value <= 0:
        raise ValueError(f"{where}: must be positive, got {value}.")


def model_patch_size(model: ModelConfig) -> int:
    """The transformer's spatial patch size: from ``model.pretrained``'s config.json, else the named config with
    its overrides; 2 (the named configs') when neither can be read (the loaders report those errors)."""
    import json

    try:
        if model.pretrained:
            with open(Path(model.pretrained) / "config.json") as f:
                patch = json.load(f).get("patch_size", 2)
        else:
            from m4v.models.configs import named_config

            patch = named_config(model.config, **model.overrides).get("patch_size", 2)
        return int(patch[-1] if isinstance(patch, list | tuple) else patch)
    except (OSError, ValueError, TypeError):
        return 2


def validate_stage(
    s: StageConfig, where: str, reward: RewardConfig | None, family: str = "pyramidflow", patch: int = 2
) -> None:
    """Check one stage; pixel sizes must be multiples of 32 x ``patch`` (8x VAE, two pyramid halvings, patch).

    For the wan family (Sec. 4.1): multiples of 16 (8x VAE, patch 2), 1 + 4k frames, no frame window.
    """
    _positive(s.steps, f"{where}.steps")
    wan = family == "wan"
    multiple = WAN_PIXEL_MULTIPLE if wan else PIXEL_MULTIPLE // 2 * patch
    why = "8x Wan VAE and patch 2" if wan else f"8x VAE, two pyramid halvings, patch {patch}"
    for name in ("height", "width"):
        v = getattr(s, name)
        if v < multiple or v % multiple:
            raise ValueError(f"{where}.{name}: must be a positive multiple of {multiple} ({why}), got {v}.")
    t = WAN_TEMPORAL if wan else PYRAMID_TEMPORAL
    if s.num_frames < 1 or (s.num_frames - 1) % t:
        examples = "1, 5, 9, ..., 81" if wan else "1, 9, 17, ..., 121"
        raise ValueError(f"{where}.num_frames: must be 1 + {t}k ({examples}), got {s.num_frames}.")
    if wan and s.frame_window is not None:
        raise ValueError(
            f"{where}.frame_window: is a pyramidflow option (autoregressive frames); the wan family trains "
            "the whole video latent, so leave it out."
        )
    if s.image_ratio is None:  # default: a one-frame stage is text-to-image, a longer one text-to-video
        s.image_ratio = 1.0 if s.num_frames == 1 else 0.0
    if not 0.0 <= s.image_ratio <= 1.0:
        raise ValueError(f"{where}.image_ratio: must be in [0, 1], got {s.image_ratio}.")
    if s.num_frames == 1 and s.image_ratio < 1.0:
        raise ValueError(f"{where}.image_ratio: must be 1.0 when num_frames is 1 (a one-frame clip is an image).")
    _positive(s.batch_size, f"{where}.batch_size")
    if s.image_batch_size is not None:
        _positive(s.image_batch_size, f"{where}.image_batch_size")
    if s.lr is not None and s.lr <= 0:
        raise ValueError(f"{where}.lr: must be positive (a learning rate of 0 trains nothing), got {s.lr}.")
    if s.warmup_steps is not None and s.warmup_steps < 0:
        raise ValueError(f"{where}.warmup_steps: must be >= 0, got {s.warmup_steps}.")
    if s.frame_window is not None and s.frame_window < 1:
        raise ValueError(f"{where}.frame_window: must be >= 1, got {s.frame_window}.")
    if s.reward and wan:
        raise ValueError(f"{where}.reward: reward learning is not supported for the wan family yet; set it to false.")
    if s.reward and reward is None:
        raise ValueError(f"{where}.reward: the stage asks for reward learning but the config has no 'reward' section.")


# Objective fields that only the pyramidal objective reads (Sec. 3.1, A.3).
PYRAMID_OBJECTIVE_FIELDS = ("stage_weights", "corruption", "corruption_eta", "scheduler")


def model_family(cfg: Any) -> str:
    """``cfg.model.family``; configs without a transformer (``m4v train-vae``) are pyramidflow."""
    return getattr(getattr(cfg, "model", None), "family", "pyramidflow")


def temporal_compression(cfg: Any) -> int:
    """Pixel frames per latent frame of the family's VAE: 8 (PyramidFlow's VAE) or 4 (Wan's)."""
    return WAN_TEMPORAL if model_family(cfg) == "wan" else PYRAMID_TEMPORAL


def validate_family(cfg: TrainConfig) -> None:
    """``model.family`` and the options that belong to one family only (wan: paper Sec. 4.1)."""
    from m4v.models.wan_configs import WAN_NAMED_CONFIGS

    m = cfg.model
    if m.family not in FAMILIES:
        raise ValueError(f"model.family: must be one of {', '.join(FAMILIES)}, got {m.family!r}.")
    if m.family != "wan":
        if m.pretrained is None and m.config in WAN_NAMED_CONFIGS:
            raise ValueError(f"model.family: {m.config!r} is a Wan config; set model.family: wan.")
        if cfg.objective.shift is not None:
            raise ValueError("objective.shift: is a wan-family option (Wan's sigma shift); leave it out.")
        return
    if m.pretrained is None and m.config not in WAN_NAMED_CONFIGS:
        raise ValueError(
            f"model.config: {m.config!r} is not a Wan config; choose one of {', '.join(WAN_NAMED_CONFIGS)} "
            "(or give model.pretrained)."
        )
    default = ObjectiveConfig()
    for name in PYRAMID_OBJECTIVE_FIELDS:
        if getattr(cfg.objective, name) != getattr(default, name):
            raise ValueError(
                f"objective.{name}: is a pyramidflow option (pyramidal flow matching); the wan family trains "
                "the whole video latent with one flow-matching loss, so leave it out."
            )
    if cfg.objective.shift is not None and not cfg.objective.shift > 0:
        raise ValueError(f"objective.shift: must be positive, got {cfg.objective.shift}.")
    if cfg.reward is not None:
        raise ValueError("reward: reward learning is not supported for the wan family yet; remove the section.")
    from m4v.models.vae import VAE_CONFIGS

    if cfg.vae in VAE_CONFIGS:
        raise ValueError(
            f"vae: {cfg.vae!r} is a pyramidflow VAE (8x time); the wan family needs 'wan-tiny' or an "
            "AutoencoderKLWan folder (e.g. the vae/ of 'm4v convert --from-wan')."
        )


def _check_wan_folder_frames(cfg: TrainConfig) -> None:
    """Video folders (``m4v.data.VideoTextDataset``) read 1 + 8k frames, so Wan stages on them need 1 + 8k."""
    source = cfg.data.source
    if source == "moving_shapes" or (Path(source) / "index.json").is_file():
        return
    for i, s in enumerate(cfg.stages):
        if (s.num_frames - 1) % PYRAMID_TEMPORAL:
            raise ValueError(
                f"stages[{i}].num_frames: video folders are read as 1 + 8k frames; use 1 + 8k (e.g. 17, 33 "
                f"or 81) with data.source {source!r}, got {s.num_frames}."
            )


def validate_loop(cfg: Any) -> None:
    """Checks shared by ``m4v train`` and ``m4v train-vae``: optimizer, EMA, precision, checkpoints, logging, data."""
    p = cfg.optim
    if p.lr <= 0:
        raise ValueError(f"optim.lr: must be positive (a learning rate of 0 trains nothing), got {p.lr}.")
    if len(p.betas) != 2 or not all(0.0 <= b < 1.0 for b in p.betas):
        raise ValueError(f"optim.betas: must be two numbers in [0, 1), got {p.betas}.")
    if p.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: must be one of {', '.join(SCHEDULES)}, got {p.schedule!r}.")
    if p.grad_clip < 0 or p.weight_decay < 0 or p.warmup_steps < 0:
        raise ValueError("optim.grad_clip, optim.weight_decay and optim.warmup_steps must be >= 0.")
    if not 0.0 <= p.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio: must be in [0, 1], got {p.min_lr_ratio}.")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ValueError(f"ema.decay: must be in [0, 1), got {cfg.ema.decay}.")
    if cfg.ema.start_step < 0:
        raise ValueError(f"ema.start_step: must be >= 0, got {cfg.ema.start_step}.")
    if cfg.train.precision not in PRECISIONS:
        raise ValueError(f"train.precision: must be one of {', '.join(PRECISIONS)}, got {cfg.train.precision!r}.")
    _positive(cfg.train.grad_accum, "train.grad_accum")
    _positive(cfg.checkpoint.every, "checkpoint.every")
    _positive(cfg.logging.every, "logging.every")
    if cfg.checkpoint.keep < 1:
        raise ValueError(f"checkpoint.keep: must be >= 1, got {cfg.checkpoint.keep}.")
    if cfg.data.num_workers < 0:
        raise ValueError(f"data.num_workers: must be >= 0, got {cfg.data.num_workers}.")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Cross-field checks; returns ``cfg``."""
    if not cfg.stages:
        raise ValueError("stages: give at least one training stage.")
    validate_family(cfg)
    patch = model_patch_size(cfg.model) if cfg.model.family != "wan" else 2
    for i, s in enumerate(cfg.stages):
        validate_stage(s, f"stages[{i}]", cfg.reward, cfg.model.family, patch)
    if cfg.model.family == "wan":
        _check_wan_folder_frames(cfg)
    o = cfg.objective
    if len(o.stage_weights) != int(cfg.objective.scheduler.get("num_stages", 3)):
        raise ValueError(f"objective.stage_weights: need one weight per pyramid stage, got {o.stage_weights}.")
    if any(w < 0 for w in o.stage_weights) or sum(o.stage_weights) <= 0:
        raise ValueError(f"objective.stage_weights: must be >= 0 and not all 0, got {o.stage_weights}.")
    if o.corruption not in CORRUPTIONS:
        raise ValueError(f"objective.corruption: must be one of {', '.join(CORRUPTIONS)}, got {o.corruption!r}.")
    if not 0.0 <= o.corruption_eta <= 1.0:
        raise ValueError(f"objective.corruption_eta: must be in [0, 1], got {o.corruption_eta}.")
    if not 0.0 <= o.text_dropout <= 1.0:
        raise ValueError(f"objective.text_dropout: must be in [0, 1], got {o.text_dropout}.")
    validate_loop(cfg)
    if cfg.reward is not None:
        r = cfg.reward
        if r.clip_dir is None and r.aesthetic_dir is None:
            raise ValueError("reward: give clip_dir and/or aesthetic_dir (local folders; nothing is downloaded).")
        if r.frame_window < 1 or r.decode_context < 0 or r.num_pixel_frames < 1:
            raise ValueError("reward: frame_window and num_pixel_frames must be >= 1, decode_context >= 0.")
        if any(s not in (0, 1, 2) for s in r.stages):
            raise ValueError(f"reward.stages: pyramid stages are 0, 1, 2; got {r.stages}.")
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read and validate a training YAML; ``overrides`` maps dotted keys (``optim.lr``) to new values."""
    data = read_yaml(path)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return validate(from_dict(TrainConfig, data, ""))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--config: {path} is a folder; give a YAML file.")
    if not path.is_file():
        raise ValueError(f"--config: file {path} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"--config: {path} is not valid YAML{where}: {problem}.") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--config: {path} is not a UTF-8 text file.") from e
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a YAML mapping at the top level.")
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", 1e-5)``; list items as ``stages.0.lr``."""
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"--set: {key!r} is not a dotted key such as optim.lr or stages.0.steps.")
    cur: Any = data
    for depth, p in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(cur, list):
            if not p.isdigit() or int(p) >= len(cur):
                raise ValueError(f"--set {key}: {here} is not an item of a list of {len(cur)} (0 to {len(cur) - 1}).")
            if last:
                cur[int(p)] = value
            else:
                cur = cur[int(p)]
        elif isinstance(cur, dict):
            if last:
                cur[p] = value
            else:
                if cur.get(p) is None:  # absent, or null in the YAML (e.g. "reward:" with nothing under it)
                    cur[p] = {}
                cur = cur[p]
        else:
            parent = ".".join(parts[:depth])
            raise ValueError(f"--set {key}: {parent} is a single value ({cur!r}), not a section with keys.")


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-5"`` -> ("optim.lr", 1e-05); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"--set: expected KEY=VALUE, got {text!r}.")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"--set {key.strip()}: the value {raw!r} is not valid YAML.") from e
