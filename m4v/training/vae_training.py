"""``m4v train-vae``: train the causal video VAE (paper Sec. 3.1: 8x8x8, 16 channels) on the same sources.

Loss: reconstruction (L1 or MSE, mean over pixels) of the decoded posterior sample, plus
``kl_weight`` times the KL divergence to N(0, I) (mean over latent elements). Image and video batches,
stages, AdamW, EMA, FSDP2, DCP checkpoints and exact resume work as in :mod:`m4v.training.trainer`.
The final export is a :class:`m4v.models.vae.VideoVAE` folder whose latent normalisation (shift/scale of
the first and of the later latent frames) is estimated from encoded training clips.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from m4v.io.paths import check_output_folder
from m4v.training.checkpoint import checkpoint_path, resolve_resume, resume_checkpoint, save_checkpoint
from m4v.training.config import (
    CheckpointConfig,
    DataConfig,
    EMAConfig,
    LoggingConfig,
    ObjectiveConfig,
    OptimConfig,
    RunConfig,
    StageConfig,
    StageSchedule,
    from_dict,
    read_yaml,
    set_dotted,
    validate_loop,
    validate_stage,
)
from m4v.training.data import Planner, SourceSet, StepStream, is_shard_folder, make_loader
from m4v.training.distributed import DistInfo, barrier, cleanup, init_distributed, shard_model
from m4v.training.ema import EMA
from m4v.training.metrics import MetricsWriter
from m4v.training.optim import build_optimizer, learning_rate, no_decay_names, set_lr
from m4v.training.seeding import derive_seed, generator
from m4v.training.stop import GracefulStop, check_finite_loss, report_stop, should_stop
from m4v.training.trainer import resolve_precision

logger = logging.getLogger(__name__)


@dataclass
class VAEModelConfig:
    """A named VAE config of ``m4v.models.vae`` (+ overrides) or a VideoVAE/diffusers folder to fine-tune."""

    config: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    # Decoder-only fine-tuning of ``pretrained``: the encoder and the latent normalisation stay as they are,
    # so latents prepared (and transformers trained) with the pretrained VAE stay valid.
    freeze_encoder: bool = False


@dataclass
class VAELossConfig:
    reconstruction: str = "l1"
    kl_weight: float = 1e-6
    sample_posterior: bool = True
    norm_samples: int = 16


@dataclass
class VAETrainConfig(StageSchedule):
    """YAML schema of ``m4v train-vae`` (stages as in ``m4v train``; reward/frame keys unused)."""

    stages: list[StageConfig]
    seed: int = 0
    output_dir: str = "runs/vae"
    vae: VAEModelConfig = field(default_factory=VAEModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=[0.9, 0.999]))
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(enabled=False))
    train: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # only to share the step planner
    reward: None = None

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: give at least one training stage.")
        for i, s in enumerate(self.stages):
            validate_stage(s, f"stages[{i}]", None)
        if self.loss.reconstruction not in ("l1", "mse"):
            raise ValueError(f"loss.reconstruction: must be l1 or mse, got {self.loss.reconstruction!r}.")
        if self.loss.kl_weight < 0:
            raise ValueError(f"loss.kl_weight: must be >= 0, got {self.loss.kl_weight}.")
        if self.loss.norm_samples < 1:
            raise ValueError(f"loss.norm_samples: must be >= 1, got {self.loss.norm_samples}.")
        validate_loop(self)
        if self.vae.freeze_encoder and not self.vae.pretrained:
            raise ValueError("vae.freeze_encoder: needs vae.pretrained (the VAE whose decoder is fine-tuned).")
        if is_shard_folder(self.data.source):
            raise ValueError("data.source: VAE training needs pixels, not a 'm4v prepare' latent folder.")


def load_vae_config(path: str | Path, overrides: dict[str, Any] | None = None) -> VAETrainConfig:
    data = read_yaml(path)
    for k, v in (overrides or {}).items():
        set_dotted(data, k, v)
    data.pop("reward", None)
    if "model" in data:
        raise ValueError(f"--config: {path} has a 'model' section: it is an 'm4v train' config, not a VAE one.")
    return from_dict(VAETrainConfig, data, "")


def build_autoencoder(cfg: VAEModelConfig, seed: int) -> Any:
    from diffusers import AutoencoderKLLTXVideo

    from m4v.models.vae import VAE_CONFIGS
    from m4v.training.components import check_overrides, load_pretrained

    if cfg.pretrained:
        return load_pretrained(AutoencoderKLLTXVideo, cfg.pretrained, "vae.pretrained").float()
    if cfg.config not in VAE_CONFIGS:
        raise ValueError(f"vae.config: unknown VAE config {cfg.config!r}; choose one of {', '.join(VAE_CONFIGS)}.")
    check_overrides(AutoencoderKLLTXVideo, cfg.overrides, "vae.overrides")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "vae-train-init") % (1 << 63))
        return AutoencoderKLLTXVideo(**{**VAE_CONFIGS[cfg.config], **cfg.overrides})


def vae_loss(
    model: Any, video: torch.Tensor, gens: list[torch.Generator], loss_cfg: VAELossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(recon + kl_weight * KL, parts) for video [B, 3, F, H, W] in [-1, 1]; per-sample posterior noise."""
    post = model.encode(video).latent_dist  # no autograd graph when the encoder is frozen (requires_grad off)
    z = post.mean
    if loss_cfg.sample_posterior:
        noise = torch.stack([torch.randn(z.shape[1:], generator=g) for g in gens]).to(z.device, z.dtype)
        z = z + post.std * noise
    recon = model.decode(z).sample
    diff = recon.float() - video.float()
    rec = diff.abs().mean() if loss_cfg.reconstruction == "l1" else diff.square().mean()
    kl = 0.5 * (post.mean.float().square() + post.var.float() - 1.0 - post.logvar.float()).mean()
    return rec + loss_cfg.kl_weight * kl, {"recon": rec.detach(), "kl": kl.detach()}


class VAETrainer:
    """Trains ``AutoencoderKLLTXVideo`` with the shared step planner, FSDP2, EMA and DCP checkpoints."""

    def __init__(self, cfg: VAETrainConfig, info: DistInfo | None = None) -> None:
        self.cfg, self.info = cfg, info or init_distributed()
        self.device = self.info.device
        self.out = check_output_folder(cfg.output_dir, "output_dir")
        resolve_resume(cfg.checkpoint.resume, self.out)  # a resume that cannot work fails before any building
        self.autocast_dtype = resolve_precision(cfg.train.precision, self.device)
        self.sources = SourceSet(cfg)  # type: ignore[arg-type]
        self.planner = Planner(cfg, self.sources.pools, self.info.world)  # type: ignore[arg-type]
        self.planner.prime()
        model = build_autoencoder(cfg.vae, cfg.seed).to(self.device)
        model.train()
        if cfg.vae.freeze_encoder:
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("decoder."))
        exempt = no_decay_names(model)
        if cfg.train.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if self.info.distributed:
            shard_model(model, self.info, cfg.train.fsdp_reshard_after_forward)
        self.model = model
        self.optimizer = build_optimizer(model, cfg, exempt)  # type: ignore[arg-type]
        self.ema = EMA(model, cfg.ema.decay, cfg.ema.start_step) if cfg.ema.enabled else None
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.stopped_by: int | None = None  # signal that ended the last train() early
        self.exported: Path | None = None  # the final/vae folder the last train() wrote
        resumed = resume_checkpoint(cfg.checkpoint.resume, self.out, model, self.optimizer, self.ema, self.info)
        if resumed is not None:
            self.step = int(resumed[1]["step"])
            if self.info.is_main:
                logger.info("resumed from %s at step %d", resumed[0], self.step)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train(self, stop_at: int | None = None, time_limit: float | None = None) -> list[dict[str, Any]]:
        """Optimizer steps up to ``stop_at`` or ``time_limit`` minutes (then checkpoint and export, as at the end);
        SIGTERM / SIGINT end the run the same way after the step in flight (``m4v.training.stop``)."""
        cfg, info, accum = self.cfg, self.info, self.cfg.train.grad_accum
        deadline = None if time_limit is None else time.monotonic() + 60.0 * time_limit
        timed_out = False
        end = cfg.total_steps if stop_at is None else min(stop_at, cfg.total_steps)
        self.exported = None
        if self.step >= end:
            if info.is_main:
                logger.info("nothing to train: %s is at step %d, the stop is at step %d", self.out, self.step, end)
            return self.history
        stream = StepStream(cfg, self.planner, info.rank, info.world, self.step * accum, end * accum)  # type: ignore[arg-type]
        loader = make_loader(stream, cfg.data.num_workers, cfg.data.prefetch_factor)
        writer = MetricsWriter(self.out, cfg.logging.tensorboard, "vae_metrics.csv") if info.is_main else None
        if writer is not None:
            writer.truncate_from(self.step)
            with open(self.out / "config.yaml", "w") as f:  # the resolved config, as m4v train writes it
                yaml.safe_dump(_asdict(cfg), f, sort_keys=False)
        bar = tqdm(total=end, initial=self.step, desc="train-vae", disable=not (cfg.logging.progress and info.is_main))
        parts: list[torch.Tensor] = []
        t0 = time.perf_counter()
        with GracefulStop() as stop:
            try:
                for batch in loader:
                    plan = self.planner.plan(int(batch["micro_step"]))
                    m = plan.micro_step % accum
                    if m == 0:
                        set_lr(self.optimizer, learning_rate(cfg, plan.step))  # type: ignore[arg-type]
                    if info.distributed:
                        self.model.set_requires_gradient_sync(m == accum - 1)
                    video = batch["video"].to(self.device)
                    gens = [generator(cfg.seed, "vae-post", mi, j) for mi, j in plan.sample_keys(info.rank, info.world)]
                    with self._autocast():
                        loss, p = vae_loss(self.model, video, gens, cfg.loss)
                    (loss / accum).backward()
                    parts.append(torch.stack([loss.detach().float(), p["recon"].float(), p["kl"].float()]))
                    if m < accum - 1:
                        continue
                    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
                    grads = [q for q in self.model.parameters() if q.grad is not None]
                    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
                    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:
                        self.ema.update(self.model, plan.step)
                    vals = torch.stack(parts).mean(0).to(self.device)
                    if info.distributed:
                        dist.all_reduce(vals, op=dist.ReduceOp.SUM)
                        vals /= info.world
                    vals = vals.cpu()
                    dt, t0 = time.perf_counter() - t0, time.perf_counter()
                    check_finite_loss(float(vals[0]), plan.step, self.optimizer.param_groups[0]["lr"], self.out)
                    rec = {
                        "step": plan.step, "stage_index": plan.stage_index, "kind": plan.kind, "loss": float(vals[0]),
                        "recon": float(vals[1]), "kl": float(vals[2]), "lr": self.optimizer.param_groups[0]["lr"],
                        "grad_norm": float(norm), "step_time": dt,
                    }
                    parts = []
                    self.step = plan.step + 1
                    self.history.append(rec)
                    bar.update(1)
                    post = f"loss {rec['loss']:.4f} | recon {rec['recon']:.4f} | kl {rec['kl']:.3g}"
                    bar.set_postfix_str(post, refresh=False)
                    timed_out = self.step < end and should_stop(deadline, stop, info)
                    last = self.step == end or timed_out
                    if writer is not None and (self.step % cfg.logging.every == 0 or last):
                        writer.write(rec)
                    if self.step % cfg.checkpoint.every == 0 or last:
                        meta = {"step": self.step, "config": _asdict(cfg)}
                        save_checkpoint(checkpoint_path(self.out, self.step), self.model, self.optimizer, self.ema,
                                        meta, info, keep=cfg.checkpoint.keep)
                    if timed_out:
                        break
            finally:
                bar.close()
                if writer is not None:
                    writer.close()
            self.stopped_by = stop.signum if timed_out else None
            if timed_out and info.is_main:
                report_stop(stop, time_limit, self.step, end)
            if (self.step == cfg.total_steps or timed_out) and cfg.checkpoint.export_final:
                self.exported = self.export(self.out / "final" / "vae")
        return self.history

    @torch.no_grad()
    def estimate_norm(self) -> Any:
        """Latent normalisation fitted on ``loss.norm_samples`` clips of the last video stage (identity if none)."""
        from m4v.models.vae import LatentNorm

        video_stages = [i for i, s in enumerate(self.cfg.stages) if s.num_frames > 1]
        if not video_stages or self.cfg.loss.norm_samples < 1:
            return LatentNorm(0.0, 1.0, 0.0, 1.0)
        i = video_stages[-1]
        src = self.sources.get(i)
        _, pool = src.pools()
        lat = []
        for item in pool[: self.cfg.loss.norm_samples]:
            video = src.load("video", item, (self.cfg.stages[i].num_frames - 1) // 8 + 1)["video"][None].to(self.device)
            lat.append(self.model.encode(video).latent_dist.mean.float().cpu())
        return LatentNorm.estimate(torch.cat(lat))

    def export(self, folder: str | Path) -> Path:
        """A VideoVAE folder (EMA weights when enabled) with the estimated latent normalisation (collective)."""
        from diffusers import AutoencoderKLLTXVideo
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from m4v.models.vae import VideoVAE

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.ema is not None:
            full = {**full, **self.ema.full_state_dict()}
        from m4v.models.vae import stored_latent_norm

        # a frozen encoder keeps the pretrained VAE's latent space, so its stored normalisation too
        norm = stored_latent_norm(self.model) if self.cfg.vae.freeze_encoder else self.estimate_norm()
        if self.info.is_main:
            cfg = {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}
            m = AutoencoderKLLTXVideo.from_config(cfg)
            m.load_state_dict(full)
            VideoVAE(m, norm).save_pretrained(folder)
        barrier(self.info)
        return Path(folder)


def _asdict(cfg: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)


def run_vae_training(cfg: VAETrainConfig, stop_at: int | None = None, time_limit: float | None = None) -> VAETrainer:
    info = init_distributed()
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING, format="%(message)s")
    try:
        trainer = VAETrainer(cfg, info)
        trainer.train(stop_at, time_limit)
        return trainer
    finally:
        cleanup(info)


def reconstruction_error(vae_dir: str, video: torch.Tensor) -> float:
    """Mean absolute error of encode -> decode of ``video`` [B, 3, F, H, W] with a saved VideoVAE."""
    from m4v.models.vae import VideoVAE

    vae = VideoVAE.from_pretrained(vae_dir)
    rec = vae.decode(vae.encode(video, sample=False))
    return float(F.l1_loss(rec, video.clamp(-1, 1)))
