"""``m4v prepare``: pre-extract VAE latents and text features into safetensors shards (training reads no video).

Layout of the output folder::

    OUT/index.json                 {"format": "m4v-latent-shards", "geometries": [...], "null_text": ...}
    OUT/null_text.safetensors      encoding of "" (token_states [L, D], pooled [Dp])
    OUT/HxWxF/index.json           items: shard, key, caption, frames, text_len, source; skipped counts
    OUT/HxWxF/shard-rR-NNNNN.safetensors   "<key>/latents" [16, T, H/8, W/8], "<key>/text", "<key>/pooled"

Latents are the normalised VAE latents (posterior mean unless ``data.vae_sample``); text features keep
only the valid tokens of each prompt. Bad items (unreadable, truncated, too short, missing caption,
non-finite latents) are skipped and counted by reason. Under torchrun every rank takes items
``rank::world`` and rank 0 merges the indexes.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from m4v.training.data import SHARD_FORMAT, geometry_name
from m4v.training.seeding import generator
from m4v.training.text import encode_null, unbatch_text

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _ShardWriter:
    def __init__(self, folder: Path, rank: int, shard_size: int, dtype: torch.dtype) -> None:
        self.folder, self.rank, self.shard_size, self.dtype = folder, rank, shard_size, dtype
        self.buffer: dict[str, torch.Tensor] = {}
        self.pending: list[dict[str, Any]] = []
        self.items: list[dict[str, Any]] = []
        self.count = 0

    def add(self, key: str, latents: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, info: dict) -> None:
        self.buffer[f"{key}/latents"] = latents.to(self.dtype).contiguous()
        self.buffer[f"{key}/text"] = text.to(self.dtype).contiguous()
        self.buffer[f"{key}/pooled"] = pooled.to(self.dtype).contiguous()
        self.pending.append(dict(info, key=key))
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-r{self.rank}-{self.count:05d}.safetensors"
        save_file(self.buffer, str(self.folder / name), metadata={"format": SHARD_FORMAT})
        self.items.extend(dict(p, shard=name) for p in self.pending)
        self.buffer, self.pending = {}, []
        self.count += 1


def _dataset(source: str, data: Any, height: int, width: int, num_frames: int) -> Any:
    if source == "moving_shapes":
        from m4v.data import MovingShapes

        ms = data.moving_shapes
        return MovingShapes(
            ms.num_samples, height, width, num_frames, seed=ms.seed, split=ms.split,
            max_objects=ms.max_objects, paraphrase_prob=ms.paraphrase_prob,
        )
    from m4v.data import VideoTextDataset

    return VideoTextDataset(source, height, width, num_frames, root=data.root, frame_stride=data.frame_stride)


def _load(ds: Any, index: int) -> tuple[dict[str, Any] | None, str | None]:
    """(item, None) or (None, skip reason), without VideoTextDataset's fall-back to another item."""
    if not hasattr(ds, "load"):
        return ds[index], None
    from m4v.data.video_folder import SkipItem

    try:
        return ds.load(index), None
    except SkipItem as e:
        logger.warning("prepare: skipping item %d: %s", index, e)
        return None, e.reason


class _Loading(torch.utils.data.Dataset):
    """``(index, item or None, skip reason or None)`` for the given indices, in order (DataLoader workers decode)."""

    def __init__(self, ds: Any, indices: Sequence[int]) -> None:
        self.ds, self.indices = ds, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, dict[str, Any] | None, str | None]:
        item, reason = _load(self.ds, self.indices[k])
        return self.indices[k], item, reason


def _identity(x: Any) -> Any:
    return x


@torch.no_grad()
def prepare_geometry(
    source: str,
    data: Any,
    out: Path,
    height: int,
    width: int,
    num_frames: int,
    vae: Any,
    text_encoder: Any,
    batch_size: int = 8,
    shard_size: int = 256,
    dtype: str = "bfloat16",
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    num_workers: int = 0,
    ds: Any = None,
) -> dict[str, Any]:
    """Encode one geometry; writes this rank's shards and ``items-r{rank}.json``; returns its summary.

    ``num_workers`` DataLoader processes decode (or render) the items; they are consumed in index order, so the
    shards do not depend on it.
    """
    folder = out / geometry_name(height, width, num_frames)
    folder.mkdir(parents=True, exist_ok=True)
    ds = _dataset(source, data, height, width, num_frames) if ds is None else ds
    skipped: Counter[str] = Counter(getattr(ds, "skipped", {})) if rank == 0 else Counter()
    writer = _ShardWriter(folder, rank, shard_size, DTYPES[dtype])
    groups: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    device = getattr(vae, "device", torch.device("cpu"))

    def encode(group: list[tuple[int, dict[str, Any]]]) -> None:
        video = torch.stack([it["video"] for _, it in group]).to(device)
        g = None
        if data.vae_sample:
            g = generator(seed, "prepare", height, width, num_frames, group[0][0], device=device)
        lat = vae.encode(video, generator=g, sample=bool(data.vae_sample)).float().cpu()
        text = unbatch_text(text_encoder([it["caption"] for _, it in group]))
        for (index, it), z, (tok, pooled) in zip(group, lat, text):
            if not torch.isfinite(z).all():
                skipped["nonfinite_latents"] += 1
                continue
            meta = it.get("meta", {})
            info = dict(caption=it["caption"], frames=int(z.shape[1]), text_len=int(tok.shape[0]), index=index)
            if isinstance(meta, dict) and "path" in meta:
                info["source"] = meta["path"]
            writer.add(f"{index:08d}", z, tok.float().cpu(), pooled.float().cpu(), info)

    indices = range(rank, len(ds), world)
    loading = torch.utils.data.DataLoader(
        _Loading(ds, indices), batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity
    )
    bar = tqdm(loading, desc=f"prepare {folder.name}", disable=not progress or rank != 0, dynamic_ncols=True)
    for index, item, reason in bar:
        if item is None:
            skipped[reason or "unknown"] += 1
            bar.set_postfix(skipped=sum(skipped.values()))
            continue
        frames = int(item["video"].shape[1])
        groups.setdefault(frames, []).append((index, item))
        if len(groups[frames]) >= batch_size:
            encode(groups.pop(frames))
    for frames in sorted(groups):
        encode(groups[frames])
    writer.flush()
    summary = {"items": writer.items, "skipped": dict(skipped)}
    (folder / f"items-r{rank}.json").write_text(json.dumps(summary))
    return summary


def merge_geometry(folder: Path, world: int, height: int, width: int, num_frames: int, dtype: str) -> dict[str, Any]:
    """Rank 0: merge the per-rank item lists of one geometry into its index.json."""
    items: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    for r in range(world):
        part = json.loads((folder / f"items-r{r}.json").read_text())
        items.extend(part["items"])
        skipped.update(part["skipped"])
        (folder / f"items-r{r}.json").unlink()
    items.sort(key=lambda it: it["index"])
    index = dict(
        height=height, width=width, num_frames=num_frames,
        # as encoded (8x for the PyramidFlow VAE, 4x for Wan's), not derived from one compression factor
        num_latent_frames=max((int(it["frames"]) for it in items), default=0),
        dtype=dtype, items=items, skipped=dict(skipped),
    )
    (folder / "index.json").write_text(json.dumps(index, indent=1))
    return index


def prepare(
    source: str,
    data: Any,
    out: str | Path,
    geometries: Sequence[tuple[int, int, int]],
    vae: Any,
    text_encoder: Any,
    specs: dict[str, Any],
    batch_size: int = 8,
    shard_size: int = 256,
    dtype: str = "bfloat16",
    seed: int = 0,
    progress: bool = True,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Prepare every geometry; collective under torchrun (every rank must call it). Returns the top index."""
    import torch.distributed as dist

    if dtype not in DTYPES:
        raise ValueError(f"--dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("--batch-size and --shard-size must be >= 1.")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    out = Path(out)
    top_path = out / "index.json"
    if top_path.is_file():  # adding geometries to an earlier prepare: same encoders, or the shards would mix them
        try:
            earlier = json.loads(top_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--out: {top_path} is damaged ({e}); give a new folder.") from e
        for key, spec in specs.items():
            if key in earlier and earlier[key] != spec:
                raise ValueError(
                    f"--out: {out} was prepared with {key} {earlier[key]!r}, not {spec!r}; shards of two encoders "
                    "cannot be mixed. Give a new --out folder."
                )
    # every geometry's data set is opened (source and sizes checked) before anything is written
    datasets = {(h, w, f): _dataset(source, data, h, w, f) for h, w, f in geometries}
    created = [p for p in (out, *(out / geometry_name(*g) for g in geometries)) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    totals: dict[str, Any] = {}
    empty: dict[str, dict[str, int]] = {}
    try:
        for h, w, f in geometries:
            prepare_geometry(
                source, data, out, h, w, f, vae, text_encoder, batch_size, shard_size, dtype, seed, rank, world,
                progress, num_workers, ds=datasets[(h, w, f)],
            )
            if distributed:
                dist.barrier()
            if rank == 0:
                name = geometry_name(h, w, f)
                idx = merge_geometry(out / name, world, h, w, f, dtype)
                if idx["items"]:
                    totals[name] = {"items": len(idx["items"]), "skipped": idx["skipped"]}
                else:  # nothing usable: no folder that training would take for data
                    shutil.rmtree(out / name, ignore_errors=True)
                    empty[name] = idx["skipped"]
        if distributed:  # every rank learns whether anything was usable, so that all of them stop alike
            shared = [totals]
            dist.broadcast_object_list(shared, src=0)
            totals = shared[0]
        if not totals:
            raise ValueError(f"--data: {source} gave no usable item for {', '.join(empty)} (skipped: {empty}).")
    except BaseException:
        if rank == 0:  # interrupted or failed: remove what this call created, leave earlier geometries alone
            for p in reversed(created):
                shutil.rmtree(p, ignore_errors=True)
        raise
    for name, skips in empty.items():
        logger.warning("prepare: %s has no usable item (skipped: %s); it is left out of %s", name, skips, top_path)
    if rank == 0:
        null = encode_null(text_encoder)
        save_file(
            {"token_states": null.token_states[0].float().cpu().contiguous(), "pooled": null.pooled[0].float().cpu()},
            str(out / "null_text.safetensors"),
        )
        top = json.loads(top_path.read_text()) if top_path.is_file() else {"geometries": {}}
        top.update(format=SHARD_FORMAT, version=1, null_text="null_text.safetensors", **specs)
        top["geometries"].update(totals)
        top_path.write_text(json.dumps(top, indent=1))
    if distributed:
        dist.barrier()
    return totals
