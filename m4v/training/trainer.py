"""The M4V training loop (paper Sec. 3, D.1): pyramidal flow matching over a progressive stage schedule.

One process (``m4v train --config C.yaml``) or N under torchrun (``torchrun --nproc_per_node N -m m4v
train --config C.yaml``) with FSDP2 (``fully_shard`` per block, then the root; gloo on CPU, nccl on
GPU). fp32 master weights with bf16 autocast (``train.precision``), gradient clipping, AdamW, EMA,
optional gradient checkpointing and torch.compile, CSV/TensorBoard logs, a rank-0 progress bar, and
DCP checkpoints that resume exactly (every random draw is a function of the seed and the step).

``model.family: wan`` trains M4V (Wan2.1) instead (Sec. 4.1): M4VWanTransformer, whole-video latents
from Wan's VAE and the full-sequence flow-matching loss (:mod:`m4v.training.wan_objective`), with the
same sharding (``fully_shard`` per Wan block), EMA, checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm

from m4v.io.paths import check_output_folder
from m4v.models.text_encoders import TextEmbeddings
from m4v.schedulers import PyramidFlowMatchScheduler
from m4v.training.checkpoint import checkpoint_path, resolve_resume, resume_checkpoint, save_checkpoint
from m4v.training.components import build_transformer, load_family_text_encoder, load_vae
from m4v.training.config import TrainConfig
from m4v.training.data import Planner, ShardIndex, SourceSet, StepPlan, StepStream, is_shard_folder, make_loader
from m4v.training.distributed import DistInfo, barrier, init_distributed, shard_model
from m4v.training.ema import EMA
from m4v.training.metrics import MetricsWriter, RunningMean
from m4v.training.objective import PyramidFlowObjective, token_count
from m4v.training.optim import build_optimizer, learning_rate, no_decay_names, set_lr
from m4v.training.seeding import generator
from m4v.training.stop import GracefulStop, check_finite_loss, report_stop, should_stop
from m4v.training.text import encode_null, stack_text, text_to
from m4v.training.wan_objective import WanFlowObjective, wan_token_count

logger = logging.getLogger(__name__)

# M4VTransformer returns a reshaped view; FSDP2 warns that in-place ops on it would skip its backward
# hook. The training loop never modifies the model output in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 (``auto`` on CUDA) or None for plain fp32 (``auto`` on CPU)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs the schedule.

    ``vae``, ``text_encoder`` and ``reward_scorer`` may be given directly (tests, stand-ins); otherwise
    they are loaded from the config. Data in ``m4v prepare`` shards needs neither VAE nor text encoder
    (the VAE only for reward stages).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        vae: Any = None,
        text_encoder: Any = None,
        reward_scorer: Any = None,
        info: DistInfo | None = None,
    ) -> None:
        self.cfg = cfg
        self.info = info or init_distributed()
        self.device = self.info.device
        self.out = check_output_folder(cfg.output_dir, "output_dir")
        resolve_resume(cfg.checkpoint.resume, self.out)  # a resume that cannot work fails before any building
        self.autocast_dtype = resolve_precision(cfg.train.precision, self.device)
        self.accum = cfg.train.grad_accum

        # data: sources of every stage are opened now, so a bad config fails before training
        self.sources = SourceSet(cfg)
        self.planner = Planner(cfg, self.sources.pools, self.info.world)
        self.planner.prime()
        self.latent_data = is_shard_folder(cfg.data.source)
        self.wan = cfg.model.family == "wan"

        # model, optimizer, EMA
        model = build_transformer(cfg.model, cfg.seed).to(self.device)
        exempt = no_decay_names(model)
        if cfg.train.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if self.info.distributed and self.wan:
            shard_blocks(model, list(model.blocks), self.info, cfg.train.fsdp_reshard_after_forward)
        elif self.info.distributed:
            shard_model(model, self.info, cfg.train.fsdp_reshard_after_forward)
        if cfg.train.compile:
            for block in model.blocks if self.wan else [*model.dual_blocks, *model.single_blocks]:
                block.compile()
        self.model = model
        self.model.train()
        self.patch: Any = tuple(model.config.patch_size) if self.wan else int(model.config.patch_size)
        self.optimizer = build_optimizer(model, cfg, exempt)
        self.ema = EMA(model, cfg.ema.decay, cfg.ema.start_step) if cfg.ema.enabled else None

        # frozen encoders and the null text
        needs_reward = any(s.reward for s in cfg.stages)
        self.vae = vae
        if self.vae is None and (not self.latent_data or needs_reward):
            self.vae = load_vae(cfg.vae, cfg.seed)
        if self.vae is not None:
            self.vae.to(self.device)
            if self.autocast_dtype is not None and self.device.type == "cuda" and hasattr(self.vae, "model"):
                self.vae.model.to(self.autocast_dtype)
        self.text_encoder = None
        if self.latent_data:
            shards = ShardIndex(cfg.data.source)
            for key in ("text_encoder", "vae"):
                made_with = shards.meta.get(key)
                if made_with is not None and made_with != getattr(cfg, key) and self.info.is_main:
                    logger.warning("data.source: the shards were made with %s %r; the config's %r is not used "
                                   "(the shards' is, also in final/).", key, made_with, getattr(cfg, key))
            tok, pooled = shards.null_text()
            mask = torch.ones(1, tok.shape[0], dtype=torch.bool)
            self.null_text = text_to(TextEmbeddings(tok[None], mask, pooled[None]), self.device, torch.float32)
        else:
            self.text_encoder = text_encoder
            if self.text_encoder is None:
                self.text_encoder = load_family_text_encoder(cfg.text_encoder, cfg.model.family)
            self.text_encoder.to(self.device)
            self.null_text = text_to(encode_null(self.text_encoder), self.device, torch.float32)
        self._check_dims(model)

        o = cfg.objective
        self.objective: Any
        if self.wan:
            self.objective = WanFlowObjective(o.text_dropout, int(model.config.text_len))
        else:
            scheduler = PyramidFlowMatchScheduler(**cfg.objective.scheduler)
            self.objective = PyramidFlowObjective(scheduler, o.corruption, o.corruption_eta, o.text_dropout)
        self.reward = None
        if needs_reward:
            from m4v.training.reward import RewardLearner

            assert cfg.reward is not None
            self.reward = RewardLearner(cfg.reward, self.vae, reward_scorer).to(self.device)

        # state
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.stopped_by: int | None = None  # signal that ended the last train() early
        self.exported: Path | None = None  # the final/ folder the last train() wrote
        self._resumed_skips: Counter[str] = Counter()
        self._lazy_by_worker: dict[int, Counter[str]] = {}
        self._eval_stream: StepStream | None = None
        resumed = resume_checkpoint(cfg.checkpoint.resume, self.out, self.model, self.optimizer, self.ema, self.info)
        if resumed is not None:
            ckpt, meta = resumed
            if meta.get("config", {}).get("stages") != cfg.to_dict()["stages"] and self.info.is_main:
                logger.warning("checkpoint: the stage schedule differs from the one the checkpoint was written with.")
            self.step = int(meta["step"])
            self._resumed_skips = Counter(meta.get("lazy_skips", {}))
            if self.info.is_main:
                logger.info("resumed from %s at step %d", ckpt, self.step)

    # ------------------------------------------------------------------------------------ helpers
    def _check_dims(self, model: Any) -> None:
        c = model.config
        what = "the prepared shards" if self.latent_data else "text_encoder"
        if self.vae is not None:
            want = 4 if self.wan else 8
            got = int(getattr(self.vae, "temporal_compression", 8))
            if got != want:
                raise ValueError(
                    f"vae: compresses time {got}x but the {self.cfg.model.family} family needs a {want}x VAE "
                    f"({'wan-tiny or an AutoencoderKLWan folder' if self.wan else 'a VideoVAE'})."
                )
        if self.wan and self.null_text.token_states.shape[-1] != c.text_dim:
            raise ValueError(
                f"{what}: gives {self.null_text.token_states.shape[-1]}-d token states but the model expects "
                f"text_dim={c.text_dim}."
            )
        if not self.wan and (
            self.null_text.token_states.shape[-1] != c.text_dim or self.null_text.pooled.shape[-1] != c.pooled_dim
        ):
            raise ValueError(
                f"{what}: gives {self.null_text.token_states.shape[-1]}-d token states and "
                f"{self.null_text.pooled.shape[-1]}-d pooled vectors but the model expects text_dim={c.text_dim} "
                f"and pooled_dim={c.pooled_dim}."
            )
        channels = getattr(self.vae, "latent_channels", c.in_channels)
        if channels != c.in_channels:
            raise ValueError(f"vae: has {channels} latent channels but the model expects in_channels={c.in_channels}.")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _inputs(self, batch: dict[str, Any], plan: StepPlan) -> tuple[torch.Tensor, TextEmbeddings]:
        """Clean latents [B, C, T, h, w] (float32, on device) and text features of a local batch."""
        if "latents" in batch:
            latents = batch["latents"].to(self.device, torch.float32)
            text = text_to(stack_text(batch["text"]), self.device, torch.float32)
            return latents, text
        video = batch["video"].to(self.device)
        g = None
        if self.cfg.data.vae_sample:
            g = generator(self.cfg.seed, "vae", plan.micro_step, self.info.rank, device=self.device)
        latents = self.vae.encode(video.to(self.vae.dtype), generator=g, sample=self.cfg.data.vae_sample)
        emb = self.text_encoder(batch["captions"])
        text = TextEmbeddings(emb[0], emb[1].bool(), emb[2])
        return latents.float(), text_to(text, self.device, torch.float32)

    @torch.no_grad()
    def evaluate(self, micro_steps: Any, use_ema: bool = False) -> float:
        """Mean flow loss (no text dropout, no update) over the batches and draws of ``micro_steps``.

        The draws use their own seeds (``"eval"``), so a fixed list of micro-steps is a fixed
        validation set. With ``use_ema`` the EMA weights are swapped in for the evaluation.
        """
        if self._eval_stream is None:
            self._eval_stream = StepStream(self.cfg, self.planner, self.info.rank, self.info.world, 0, 0)
        stream = self._eval_stream
        objective: Any
        if self.wan:
            objective = WanFlowObjective(0.0, self.objective.text_len)
        else:
            objective = PyramidFlowObjective(
                self.objective.scheduler, self.objective.corruption, self.objective.corruption_eta, 0.0
            )
        backup = None
        if use_ema and self.ema is not None:
            backup = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            params = dict(self.model.named_parameters())
            for n, v in self.ema.shadow.items():
                params[n].copy_(v)
        was_training = self.model.training
        self.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        try:
            for micro in micro_steps:
                plan = self.planner.plan(int(micro))
                latents, text = self._inputs(stream.batch(int(micro)), plan)
                keys = plan.sample_keys(self.info.rank, self.info.world)
                gens = [generator(self.cfg.seed, "eval", m, j) for m, j in keys]
                if self.wan:
                    inputs = objective.prepare(latents, text, None, gens, self._wan_shift(plan))
                else:
                    inputs = objective.prepare(latents, plan.frame_index, plan.pyramid_stage, text, None, gens)
                with self._autocast():
                    total = total + objective.loss(self.model, inputs).loss.float()
                count += 1
        finally:
            self.model.train(was_training)
            if backup is not None:
                params = dict(self.model.named_parameters())
                for n, v in backup.items():
                    params[n].copy_(v)
        from m4v.training.distributed import all_reduce_mean

        return float(all_reduce_mean(total / max(count, 1), self.info))

    def _wan_shift(self, plan: StepPlan) -> float:
        """Wan's sigma shift: ``objective.shift``, else Wan's value for the stage size (3.0 up to 832x480, else 5.0)."""
        from m4v.pipelines.pipeline_wan import wan_default_shift

        if self.cfg.objective.shift is not None:
            return float(self.cfg.objective.shift)
        stage = self.cfg.stages[plan.stage_index]
        return wan_default_shift(stage.height, stage.width)

    def _wan_micro_step(self, batch: dict[str, Any], plan: StepPlan) -> dict[str, Any]:
        """Full-sequence flow matching on the whole video latent (Sec. 4.1); no reward term."""
        latents, text = self._inputs(batch, plan)
        keys = plan.sample_keys(self.info.rank, self.info.world)
        gens = [generator(self.cfg.seed, "sample", m, j) for m, j in keys]
        inputs = self.objective.prepare(latents, text, self.null_text, gens, self._wan_shift(plan))
        with self._autocast():
            out = self.objective.loss(self.model, inputs)
        (out.loss / self.accum).backward()
        tokens = plan.batch_size * wan_token_count(latents.shape, inputs.text.token_states.shape[1], self.patch)
        flow = out.loss.detach().float()
        return {"flow": flow, "reward": torch.zeros_like(flow), "total": flow, "tokens": tokens, "stats": {}}

    def _micro_step(self, batch: dict[str, Any], plan: StepPlan) -> dict[str, Any]:
        if self.wan:
            return self._wan_micro_step(batch, plan)
        latents, text = self._inputs(batch, plan)
        keys = plan.sample_keys(self.info.rank, self.info.world)
        gens = [generator(self.cfg.seed, "sample", m, j) for m, j in keys]
        inputs = self.objective.prepare(latents, plan.frame_index, plan.pyramid_stage, text, self.null_text, gens)
        stats: dict[str, Any] = {}
        with self._autocast():
            out = self.objective.loss(self.model, inputs)
            loss = out.loss
            reward_loss = torch.zeros((), device=self.device)
            cfg_r = self.cfg.reward
            if plan.reward and self.reward is not None and cfg_r is not None and plan.pyramid_stage in cfg_r.stages:
                window = self.objective.scheduler.stage_windows[plan.pyramid_stage]
                reward_loss, stats = self.reward.loss(
                    inputs.noisy, out.pred.float(), inputs.ratio, inputs.eps, window, latents, plan.frame_index,
                    batch["captions"], ~inputs.dropped,
                )
                loss = loss + cfg_r.weight * reward_loss
        (loss / self.accum).backward()
        sizes = [(h.shape[-2], h.shape[-1]) for h in inputs.history] + [tuple(inputs.noisy.shape[-2:])]
        tokens = plan.batch_size * token_count(sizes, text.token_states.shape[1], self.patch)
        return {
            "flow": out.loss.detach().float(),
            "reward": reward_loss.detach().float(),
            "total": loss.detach().float(),
            "tokens": tokens,
            "stats": stats,
        }

    def _clip_and_step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def skipped(self) -> Counter[str]:
        """Bad data items skipped so far on this rank (construction-time + while loading + before resume)."""
        out = self.sources.construction_skips() + self._resumed_skips
        for c in self._lazy_by_worker.values():
            out = out + c
        return out

    def _lazy_skips(self) -> Counter[str]:
        out = Counter(self._resumed_skips)
        for c in self._lazy_by_worker.values():
            out = out + c
        return out

    def _global_skips(self) -> Counter[str]:
        """Skips summed over ranks (collective)."""
        lazy = self._lazy_skips() - self._resumed_skips
        if self.info.distributed:
            parts: list[Any] = [None] * self.info.world
            dist.all_gather_object(parts, dict(lazy))
            lazy = sum((Counter(p) for p in parts), Counter())
        return self.sources.construction_skips() + self._resumed_skips + lazy

    def _sync_set(self, flag: bool) -> None:
        if self.info.distributed and hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(flag)

    # ---------------------------------------------------------------------------------------- run
    def train(self, stop_at: int | None = None, time_limit: float | None = None) -> list[dict[str, Any]]:
        """Run optimizer steps ``self.step .. stop_at`` (default: the end of the schedule); returns the records.

        ``time_limit`` (minutes): stop after the first step that ends past it, checkpoint, and export
        ``output_dir/final`` as if the schedule ended there. SIGTERM / SIGINT do the same after the step in flight
        (``m4v.training.stop``; ``self.stopped_by`` holds the signal number).
        """
        cfg, info = self.cfg, self.info
        deadline = None if time_limit is None else time.monotonic() + 60.0 * time_limit
        timed_out = False
        end = cfg.total_steps if stop_at is None else min(stop_at, cfg.total_steps)
        self.exported = None
        if self.step >= end:
            if info.is_main:
                logger.info("nothing to train: %s is at step %d, the stop is at step %d", self.out, self.step, end)
            return self.history
        stream = StepStream(cfg, self.planner, info.rank, info.world, self.step * self.accum, end * self.accum)
        loader = make_loader(stream, cfg.data.num_workers, cfg.data.prefetch_factor, self.device.type == "cuda")
        writer = MetricsWriter(self.out, cfg.logging.tensorboard) if info.is_main else None
        if writer is not None:
            writer.truncate_from(self.step)
            with open(self.out / "config.yaml", "w") as f:
                yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        bar = tqdm(
            total=end, initial=self.step, desc="train", dynamic_ncols=True,
            disable=not (cfg.logging.progress and info.is_main),
        )
        running = RunningMean()
        micro_results: list[dict[str, Any]] = []
        plans: list[StepPlan] = []
        t0 = time.perf_counter()
        with GracefulStop() as stop:
            try:
                for batch in loader:
                    plan = self.planner.plan(int(batch["micro_step"]))
                    self._lazy_by_worker[int(batch["worker"])] = Counter(batch["lazy_skips"])
                    m = plan.micro_step % self.accum
                    if m == 0:
                        set_lr(self.optimizer, learning_rate(cfg, plan.step))
                    self._sync_set(m == self.accum - 1)
                    micro_results.append(self._micro_step(batch, plan))
                    plans.append(plan)
                    if m < self.accum - 1:
                        continue
                    grad_norm = self._clip_and_step()
                    if self.ema is not None:
                        self.ema.update(self.model, plan.step)
                    record = self._record(plan, plans, micro_results, grad_norm, time.perf_counter() - t0)
                    check_finite_loss(record["loss"], plan.step, record["lr"], self.out)
                    t0 = time.perf_counter()
                    micro_results, plans = [], []
                    self.step = plan.step + 1
                    self.history.append(record)
                    for p, loss in zip(record["pyramid_stages"], record["micro_flow"]):
                        running.update(p, loss)
                    bar.update(1)
                    bar.set_postfix_str(self._postfix(record, running), refresh=False)
                    timed_out = self.step < end and should_stop(deadline, stop, info)
                    last = self.step == end or timed_out
                    if self.step % cfg.logging.every == 0 or last:
                        skipped = sum(self._global_skips().values())  # collective: every rank takes part
                        if writer is not None:
                            writer.write(self._row(record, skipped))
                    if self.step % cfg.checkpoint.every == 0 or last:
                        self.save()
                    if timed_out:
                        break
            finally:
                bar.close()
                if writer is not None:
                    writer.close()
            skipped = self._global_skips()
            if info.is_main and sum(skipped.values()):
                logger.warning("data: skipped %d bad items (%s)", sum(skipped.values()), dict(skipped))
            self.stopped_by = stop.signum if timed_out else None
            if timed_out and info.is_main:
                report_stop(stop, time_limit, self.step, end)
            if (self.step == cfg.total_steps or timed_out) and cfg.checkpoint.export_final:
                self.exported = self.export(self.out / "final")  # under the guard: a second SIGTERM waits for it
        return self.history

    def _record(
        self, plan: StepPlan, plans: list[StepPlan], micro: list[dict[str, Any]], grad_norm: float, dt: float
    ) -> dict[str, Any]:
        vals = torch.stack([torch.stack([r["flow"], r["reward"], r["total"]]) for r in micro])
        vals = vals.to(self.device)
        if self.info.distributed:
            dist.all_reduce(vals, op=dist.ReduceOp.SUM)
            vals /= self.info.world
        vals = vals.cpu()
        tokens = sum(r["tokens"] for r in micro)
        stats: dict[str, float] = {}
        for r in micro:
            for k, v in r["stats"].items():
                stats[k] = stats.get(k, 0.0) + v / len(micro)
        stage = self.cfg.stages[plan.stage_index]
        return {
            "step": plan.step,
            "stage_index": plan.stage_index,
            "stage_name": stage.name or f"stage{plan.stage_index}",
            "kind": ",".join(sorted({p.kind for p in plans})),
            "pyramid_stages": [p.pyramid_stage for p in plans],
            "frames": [p.frame_index for p in plans],
            "micro_flow": vals[:, 0].tolist(),
            "loss": float(vals[:, 2].mean()),
            "flow_loss": float(vals[:, 0].mean()),
            "reward_loss": float(vals[:, 1].mean()),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_s": tokens / max(dt, 1e-9),
            "step_time": dt,
            **stats,
        }

    def _row(self, rec: dict[str, Any], skipped: int) -> dict[str, Any]:
        row = {k: v for k, v in rec.items() if not isinstance(v, list)}
        row["pyramid_stage"] = rec["pyramid_stages"][-1]
        row["frame"] = rec["frames"][-1]
        row["skipped"] = skipped
        for k in ("r_clip", "r_aesthetic"):
            row.setdefault(k, "")
        return row

    def _postfix(self, rec: dict[str, Any], running: RunningMean) -> str:
        parts = [f"loss {rec['loss']:.4f}"]
        parts += [f"s{k} {running.values[k]:.4f}" for k in sorted(running.values)]
        tps = rec["tokens_per_s"]
        parts.append(f"{tps / 1e3:.1f}k tok/s" if tps >= 1e3 else f"{tps:.0f} tok/s")
        n = sum(self.skipped().values())
        if n:
            parts.append(f"skipped {n}")
        return " | ".join(parts)

    # ------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """DCP checkpoint of the current state at ``self.step`` (collective)."""
        index, local = self.cfg.stage_at(min(self.step, self.cfg.total_steps - 1))
        meta = {
            "step": self.step,
            "micro_step": self.step * self.accum,
            "stage_index": index,
            "stage_step": local,
            "lazy_skips": dict(self._lazy_skips()),
            "config": self.cfg.to_dict(),
        }
        return save_checkpoint(
            checkpoint_path(self.out, self.step), self.model, self.optimizer, self.ema, meta, self.info,
            keep=self.cfg.checkpoint.keep,
        )

    def export(self, folder: str | Path) -> Path:
        """``folder/transformer`` (and ``folder/transformer_ema``) in diffusers save_pretrained format (collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        folder = Path(folder)
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        ema = self.ema.full_state_dict() if self.ema is not None else None
        if self.info.is_main:
            save_pretrained_state(self.model, full, folder / "transformer")
            if ema is not None:
                save_pretrained_state(self.model, {**full, **ema}, folder / "transformer_ema")
            if self.wan and self.vae is not None:
                self._export_wan_pipeline(folder)
            elif not self.wan:
                self._export_pipeline(folder)
        barrier(self.info)
        return folder

    def _export_pipeline(self, folder: Path) -> None:
        """Make ``folder`` an M4VPipeline directory (``m4v generate --model folder``): vae/, scheduler/ and
        model_index.json beside transformer/ (the trained weights; transformer_ema/ holds the EMA ones). The VAE
        and text encoder are the ones the latents were made with: the shards' for prepared data, else the config's.
        """
        from m4v.pipelines.pipeline_m4v import write_model_index

        specs = {"vae": self.cfg.vae, "text_encoder": self.cfg.text_encoder}
        if self.latent_data:
            meta = ShardIndex(self.cfg.data.source).meta
            specs = {k: meta.get(k, v) for k, v in specs.items()}
        text_spec = pipeline_text_encoder_spec(specs["text_encoder"])
        if text_spec is None:
            logger.warning("export: the text encoder %r cannot be named in model_index.json; %s holds transformer/ "
                           "weights only.", specs["text_encoder"], folder)
            return
        vae = self.vae if self.vae is not None else load_vae(specs["vae"], self.cfg.seed)
        if next(vae.parameters()).dtype != torch.float32:  # cast for autocast training: store the float32 weights
            import copy

            vae = copy.deepcopy(vae).float()
        vae.save_pretrained(folder / "vae")
        PyramidFlowMatchScheduler(**self.cfg.objective.scheduler).save_pretrained(folder / "scheduler")
        last = self.cfg.stages[-1]
        write_model_index(folder, text_spec, (last.height, last.width), last.num_frames)

    def _export_wan_pipeline(self, folder: Path) -> None:
        """Make ``folder`` an M4VWanPipeline directory: vae/, scheduler/ and model_index.json beside transformer/."""
        import copy

        from diffusers import FlowMatchEulerDiscreteScheduler

        from m4v.pipelines.pipeline_wan import write_model_index

        vae = self.vae.model
        if vae.dtype != torch.float32:
            vae = copy.deepcopy(vae).float()
        vae.save_pretrained(folder / "vae")
        shift = self.cfg.objective.shift
        FlowMatchEulerDiscreteScheduler(shift=shift or 5.0).save_pretrained(folder / "scheduler")
        spec = wan_text_encoder_spec(self.cfg.text_encoder, self.text_encoder)
        if spec is None:
            logger.warning("export: the text encoder cannot be named in model_index.json; %s holds transformer/, "
                           "vae/ and scheduler/ only (pass text_encoder= to M4VWanPipeline.from_pretrained "
                           "after writing one).", folder)
            return
        last = self.cfg.stages[-1]
        write_model_index(folder, spec, (last.height, last.width), last.num_frames, shift)


def shard_blocks(model: torch.nn.Module, blocks: list[torch.nn.Module], info: DistInfo, reshard: bool) -> None:
    """FSDP2: ``fully_shard`` every block (e.g. each Wan block), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,))
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)


def pipeline_text_encoder_spec(spec: Any) -> Any:
    """The model_index.json text-encoder entry of an M4VPipeline for the config's ``text_encoder``, folders made
    absolute; None for the test stand-in ("hash"), which no pipeline can load."""
    if spec == "minilm":
        return "minilm"
    if isinstance(spec, dict) and "hash" not in spec:
        return {k: (v if k == "max_length" else os.path.abspath(v)) for k, v in spec.items()}
    return None


def wan_text_encoder_spec(spec: Any, encoder: Any) -> Any:
    """The model_index.json text-encoder entry that reloads ``encoder`` (MiniLM or UMT5), or None (stand-ins)."""
    own = getattr(encoder, "spec", None)
    if own is not None:  # UMT5TextEncoder: absolute folders
        return dict(own)
    if spec == "minilm":
        return "minilm"
    if isinstance(spec, dict) and set(spec) <= {"minilm", "max_length"} and "minilm" in spec:
        return {k: (os.path.abspath(v) if k == "minilm" else v) for k, v in spec.items()}
    return None


def save_pretrained_state(model: Any, state: dict[str, torch.Tensor], folder: str | Path) -> None:
    """Write ``state`` with ``model``'s config as a diffusers save_pretrained folder (loadable by from_pretrained)."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})


def run_training(cfg: TrainConfig, stop_at: int | None = None, time_limit: float | None = None) -> Trainer:
    """Entry point of ``m4v train``: build the trainer, train, clean up the process group."""
    from m4v.training.distributed import cleanup

    info = init_distributed()
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING, format="%(message)s")
    try:
        trainer = Trainer(cfg, info=info)
        trainer.train(stop_at=stop_at, time_limit=time_limit)
        return trainer
    finally:
        cleanup(info)


def main(argv: list[str] | None = None) -> int:
    """``python -m m4v.training.trainer --config C.yaml`` (same options as ``m4v train``)."""
    import argparse
    import sys

    from m4v.training.cli import add_train_arguments, cmd_train

    parser = argparse.ArgumentParser(prog="python -m m4v.training.trainer")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_train(args)
    except ValueError as e:
        print(f"m4v train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
