"""Training data stream: a deterministic plan per step and the sources behind it (paper D.1).

The plan of micro-step ``s`` (which stage of the progressive schedule, image or video batch, which
pyramid stage, which latent frame, which items) is a pure function of (seed, s), identical on every
rank; rank ``r`` loads slice ``r`` of the global batch. Items of one kind are visited in reshuffled
epochs. Resuming at step ``s`` therefore only needs ``s``.

Sources (``data.source``):

* ``moving_shapes``: :class:`m4v.data.MovingShapes` rendered on the fly (image batches use one-frame clips);
* a folder / ``.csv`` / ``.jsonl``: :class:`m4v.data.VideoTextDataset` (image batches use the source's
  images, or the first frame of its videos when it has none); bad items are skipped and counted;
* a folder written by ``m4v prepare``: VAE latents and text features read from safetensors shards
  (image batches use image items, or latent frame 0 of videos: the causal VAE encodes it alone).

For the wan family (``model.family: wan``, Sec. 4.1) a plan loads the whole clip (Wan's VAE: 1 + 4k
frames -> 1 + k latents) and has no frame index or pyramid stage to draw.
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from m4v.training.config import DataConfig, StageConfig, TrainConfig, model_family, temporal_compression
from m4v.training.objective import choose_frame, choose_stage
from m4v.training.seeding import derive_seed, uniform

SHARD_FORMAT = "m4v-latent-shards"


def num_latent_frames(num_frames: int, temporal: int = 8) -> int:
    """1 + 8k video frames -> 1 + k latent frames (1 + 4k -> 1 + k through Wan's VAE: ``temporal=4``)."""
    return (num_frames - 1) // temporal + 1


def geometry_name(height: int, width: int, num_frames: int) -> str:
    return f"{height}x{width}x{num_frames}"


@dataclass(frozen=True)
class StepPlan:
    """What micro-step ``micro_step`` trains on (the same on every rank)."""

    micro_step: int
    step: int
    stage_index: int
    kind: str  # "image" or "video"
    batch_size: int  # global
    num_latent_frames: int  # latent frames loaded per clip (frame_index + 1)
    frame_index: int
    pyramid_stage: int
    reward: bool
    items: tuple[int, ...]  # global batch, item ids of the kind's pool

    def local_items(self, rank: int, world: int) -> tuple[int, ...]:
        b = self.batch_size // world
        return self.items[rank * b : (rank + 1) * b]

    def sample_keys(self, rank: int, world: int) -> list[tuple[int, int]]:
        """(micro_step, index in the global batch) of this rank's samples: the seeds of their draws."""
        b = self.batch_size // world
        return [(self.micro_step, rank * b + j) for j in range(b)]


class Planner:
    """Deterministic plans for micro-steps; ``pools(stage_index) -> (image ids, video ids)``."""

    def __init__(self, cfg: TrainConfig, pools: Any, world_size: int = 1) -> None:
        self.cfg = cfg
        self.pools = pools
        self.accum = cfg.train.grad_accum
        self.world = world_size
        self.whole_video = model_family(cfg) == "wan"  # Sec. 4.1: no frame index, no pyramid stage
        self.temporal = temporal_compression(cfg)
        self._image_counts: dict[int, np.ndarray] = {}
        self._perms: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._pool_cache: dict[int, tuple[list[int], list[int]]] = {}
        for i, s in enumerate(cfg.stages):
            for name, b in (("batch_size", s.batch_size), ("image_batch_size", s.image_batch_size)):
                if b is not None and b % world_size:
                    raise ValueError(
                        f"stages[{i}].{name}: the global batch {b} must be divisible by the {world_size} ranks."
                    )

    def prime(self) -> None:
        """Open every stage's source now (so a bad data config fails before training starts)."""
        for i, stage in enumerate(self.cfg.stages):
            images, videos = self._stage_pools(i)
            if stage.image_ratio > 0 and not images:
                raise ValueError(f"stages[{i}].image_ratio: the data source has no image for this stage.")
            if stage.image_ratio < 1 and not videos:
                raise ValueError(
                    f"stages[{i}]: the data source has no video of {stage.num_frames} frames or more "
                    "(set image_ratio: 1.0 or use longer clips)."
                )

    def _is_image(self, stage: StageConfig, micro_step: int) -> bool:
        return uniform(self.cfg.seed, "kind", micro_step) < stage.image_ratio

    def _stage_pools(self, index: int) -> tuple[list[int], list[int]]:
        if index not in self._pool_cache:
            self._pool_cache[index] = self.pools(index)
        return self._pool_cache[index]

    def _image_prefix(self, index: int) -> np.ndarray:
        """Number of image micro-steps before each micro-step of stage ``index`` (cumulative)."""
        if index not in self._image_counts:
            stage = self.cfg.stages[index]
            start = self.cfg.stage_start(index) * self.accum
            n = stage.steps * self.accum
            flags = np.fromiter((self._is_image(stage, start + k) for k in range(n)), dtype=np.int64, count=n)
            self._image_counts[index] = np.concatenate([[0], np.cumsum(flags)])
        return self._image_counts[index]

    def _perm(self, index: int, kind: str, epoch: int, n: int) -> np.ndarray:
        key = (index, kind, epoch)
        if key not in self._perms:
            rng = np.random.default_rng(derive_seed(self.cfg.seed, "perm", index, kind, epoch))
            self._perms[key] = rng.permutation(n).astype(np.int64 if n >= 2**31 else np.int32)
            while len(self._perms) > 4:  # two kinds x an epoch boundary
                self._perms.popitem(last=False)
        return self._perms[key]

    def plan(self, micro_step: int) -> StepPlan:
        cfg = self.cfg
        step = micro_step // self.accum
        index, _ = cfg.stage_at(step)
        stage = cfg.stages[index]
        local = micro_step - cfg.stage_start(index) * self.accum
        image = self._is_image(stage, micro_step)
        kind = "image" if image else "video"
        batch = (stage.image_batch_size or stage.batch_size) if image else stage.batch_size
        images, videos = self._stage_pools(index)
        pool = images if image else videos
        if not pool:
            raise ValueError(f"stages[{index}]: the data source has no {kind} item for this stage.")
        prefix = self._image_prefix(index)
        before = int(prefix[local]) if image else local - int(prefix[local])
        items = []
        for c in range(before * batch, before * batch + batch):
            epoch, pos = divmod(c, len(pool))
            items.append(pool[int(self._perm(index, kind, epoch, len(pool))[pos])])
        T = 1 if image else num_latent_frames(stage.num_frames, self.temporal)
        reward = bool(stage.reward)
        window = stage.frame_window
        if reward and cfg.reward is not None:
            window = cfg.reward.frame_window
        if self.whole_video:  # the wan family trains every latent frame at once
            frame, pyr = T - 1, 0
        else:
            frame = 0 if image else choose_frame(uniform(cfg.seed, "frame", micro_step), T, window)
            pyr = choose_stage(uniform(cfg.seed, "pyramid", micro_step), cfg.objective.stage_weights)
        return StepPlan(micro_step, step, index, kind, batch, frame + 1, frame, pyr, reward, tuple(items))


# ------------------------------------------------------------------------------------------- sources
class MovingShapesSource:
    """Moving Shapes clips at a stage's geometry (one-frame clips for image batches)."""

    latent = False
    temporal = 8  # pixel frames per latent frame (4 for the wan family)

    def __init__(self, data: DataConfig, stage: StageConfig) -> None:
        from m4v.data import MovingShapes

        ms = data.moving_shapes
        kw = dict(seed=ms.seed, split=ms.split, max_objects=ms.max_objects, paraphrase_prob=ms.paraphrase_prob)
        self.video = MovingShapes(ms.num_samples, stage.height, stage.width, stage.num_frames, **kw)
        self.image = MovingShapes(ms.num_samples, stage.height, stage.width, 1, **kw)
        self.construction_skips: Counter[str] = Counter()

    def pools(self) -> tuple[list[int], list[int]]:
        n = len(self.video)
        return list(range(n)), list(range(n))

    def load(self, kind: str, item: int, latent_frames: int) -> dict[str, Any]:
        ds = self.image if kind == "image" else self.video
        x = ds[item]
        return {"video": x["video"][:, : 1 + self.temporal * (latent_frames - 1)], "caption": x["caption"]}

    def lazy_skips(self) -> Counter[str]:
        return Counter()


class VideoFolderSource:
    """A folder / CSV / JSONL of videos and images through ``VideoTextDataset`` (bad items skipped, counted)."""

    latent = False
    temporal = 8  # pixel frames per latent frame (4 for the wan family)

    def __init__(self, data: DataConfig, stage: StageConfig) -> None:
        from m4v.data import VideoTextDataset

        kw = dict(root=data.root, frame_stride=data.frame_stride)
        self.video = VideoTextDataset(data.source, stage.height, stage.width, stage.num_frames, **kw)
        self.construction_skips = Counter(self.video.skipped)
        self.image = None
        if stage.image_ratio > 0:
            self.image = VideoTextDataset(data.source, stage.height, stage.width, 1, **kw)
            self._image_base = Counter(self.image.skipped)

    def pools(self) -> tuple[list[int], list[int]]:
        images: list[int] = []
        if self.image is not None:
            images = self.image.image_indices or list(range(len(self.image)))
        return images, self.video.video_indices

    def load(self, kind: str, item: int, latent_frames: int) -> dict[str, Any]:
        ds = self.image if kind == "image" else self.video
        assert ds is not None
        x = ds[item]
        return {"video": x["video"][:, : 1 + self.temporal * (latent_frames - 1)], "caption": x["caption"]}

    def lazy_skips(self) -> Counter[str]:
        out = self.video.skipped - self.construction_skips
        if self.image is not None:
            out = out + (self.image.skipped - self._image_base)
        return out


class ShardIndex:
    """Reader of a ``m4v prepare`` output folder (top-level index.json, one sub-folder per geometry)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / "index.json"
        if not path.is_file():
            raise ValueError(f"data.source: {self.root} has no index.json; it is not a 'm4v prepare' output.")
        self.meta = json.loads(path.read_text())
        if self.meta.get("format") != SHARD_FORMAT:
            raise ValueError(f"data.source: {path} is not a {SHARD_FORMAT} index.")

    def geometry(self, height: int, width: int, num_frames: int) -> dict[str, Any]:
        name = geometry_name(height, width, num_frames)
        if name not in self.meta["geometries"]:
            have = ", ".join(sorted(self.meta["geometries"])) or "none"
            raise ValueError(
                f"data.source: {self.root} has no latents for {name} (height x width x frames); it has {have}. "
                "Run 'm4v prepare' with this stage geometry."
            )
        return json.loads((self.root / name / "index.json").read_text())

    def null_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file

        t = load_file(str(self.root / self.meta["null_text"]))
        return t["token_states"], t["pooled"]


class ShardSource:
    """Latents and text features of one geometry from safetensors shards."""

    latent = True

    def __init__(self, data: DataConfig, stage: StageConfig) -> None:
        self.index = ShardIndex(data.source)
        self.folder = self.index.root / geometry_name(stage.height, stage.width, stage.num_frames)
        self.meta = self.index.geometry(stage.height, stage.width, stage.num_frames)
        self.items = self.meta["items"]
        self.construction_skips = Counter(self.meta.get("skipped", {}))
        self.skip_key = str(self.index.root)  # one prepared source: its geometries skipped the same files
        self._handles: OrderedDict[str, Any] = OrderedDict()

    def pools(self) -> tuple[list[int], list[int]]:
        images = [i for i, it in enumerate(self.items) if it["frames"] == 1]
        videos = [i for i, it in enumerate(self.items) if it["frames"] > 1]
        return images or videos, videos

    def _file(self, name: str) -> Any:
        from safetensors import safe_open

        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
            while len(self._handles) > 16:
                self._handles.popitem(last=False)
        return self._handles[name]

    def load(self, kind: str, item: int, latent_frames: int) -> dict[str, Any]:
        it = self.items[item]
        f = self._file(it["shard"])
        lat = f.get_slice(f"{it['key']}/latents")[:, :latent_frames].float()
        return {
            "latents": lat,
            "text": (f.get_tensor(f"{it['key']}/text").float(), f.get_tensor(f"{it['key']}/pooled").float()),
            "caption": it["caption"],
        }

    def lazy_skips(self) -> Counter[str]:
        return Counter()

    def __getstate__(self) -> dict[str, Any]:  # safetensors handles do not pickle (DataLoader workers)
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state


def is_shard_folder(source: str) -> bool:
    return (Path(source) / "index.json").is_file() and Path(source).is_dir()


def make_source(data: DataConfig, stage: StageConfig, temporal: int = 8) -> Any:
    if data.source == "moving_shapes":
        src: Any = MovingShapesSource(data, stage)
    elif is_shard_folder(data.source):
        return ShardSource(data, stage)
    else:
        src = VideoFolderSource(data, stage)
    src.temporal = temporal
    return src


class SourceSet:
    """One source per stage of the schedule, built on first use (in each process / worker)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self._sources: dict[int, Any] = {}

    def get(self, index: int) -> Any:
        if index not in self._sources:
            self._sources[index] = make_source(self.cfg.data, self.cfg.stages[index], temporal_compression(self.cfg))
        return self._sources[index]

    def pools(self, index: int) -> tuple[list[int], list[int]]:
        return self.get(index).pools()

    def construction_skips(self) -> Counter[str]:
        """Items skipped when the sources were opened; the same file list read (or prepared) at several geometries
        counts once: per reason, the largest count of any geometry."""
        by_key: dict[str, Counter[str]] = {}
        for s in self._sources.values():
            key = getattr(s, "skip_key", self.cfg.data.source)
            by_key[key] = by_key.get(key, Counter()) | s.construction_skips
        return sum(by_key.values(), Counter())

    def lazy_skips(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for s in self._sources.values():
            out += s.lazy_skips()
        return out


def collate_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixel clips or latents; text features stay per sample (padded later)."""
    out: dict[str, Any] = {"captions": [it["caption"] for it in items]}
    if "video" in items[0]:
        out["video"] = torch.stack([it["video"] for it in items])
    else:
        out["latents"] = torch.stack([it["latents"] for it in items])
        out["text"] = [it["text"] for it in items]
    return out


class StepStream(IterableDataset):
    """Local batches of micro-steps ``[start, end)`` in order; worker ``w`` of ``n`` makes steps ``w, w+n, ...``."""

    def __init__(self, cfg: TrainConfig, planner: Planner, rank: int, world: int, start: int, end: int) -> None:
        super().__init__()
        self.cfg, self.planner = cfg, planner
        self.rank, self.world = rank, world
        self.start, self.end = start, end
        self.sources = SourceSet(cfg)

    def batch(self, micro: int, worker: int = 0) -> dict[str, Any]:
        """This rank's batch of micro-step ``micro``."""
        plan = self.planner.plan(micro)
        src = self.sources.get(plan.stage_index)
        items = [src.load(plan.kind, i, plan.num_latent_frames) for i in plan.local_items(self.rank, self.world)]
        batch = collate_items(items)
        batch["micro_step"] = micro
        batch["worker"] = worker
        batch["lazy_skips"] = dict(self.sources.lazy_skips())
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for micro in range(self.start + wid, self.end, nw):
            yield self.batch(micro, wid)


def _ignore_sigint(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group; the main process handles it (``m4v.training.stop``) and may still
    need batches for the step in flight (gradient accumulation), so workers keep serving them."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(stream: StepStream, num_workers: int, prefetch_factor: int, pin_memory: bool = False) -> DataLoader:
    kw: dict[str, Any] = dict(batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
    if num_workers > 0:
        kw.update(prefetch_factor=prefetch_factor, persistent_workers=False, worker_init_fn=_ignore_sigint)
    return DataLoader(stream, **kw)
