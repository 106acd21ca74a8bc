"""Real text-video data: folder/CSV/JSONL loading, 1+8k frame sampling and 1:8 image:video mixing (D.1).

Sources
-------
* a folder (searched recursively): every video (.mp4 .mov .avi .mkv .webm .m4v .mpg .mpeg .gif
  .wmv .flv) or image (.png .jpg .jpeg .webp) with a sidecar caption file of the same stem
  (``clip.mp4`` + ``clip.txt``); hidden files are ignored;
* a ``.csv`` file with a header holding exactly the columns ``video`` and ``caption`` (others ignored);
* a ``.jsonl`` file, one object per line with the keys ``video`` and ``caption``.
Relative paths in CSV/JSONL are resolved against ``root`` (default: the file's folder). A path with an
image extension is an image (a one-frame video); anything else is decoded as a video with PyAV.

Bad data policy
---------------
Nothing is fatal except a source that cannot be read at all (missing source, wrong CSV columns or
JSONL keys, no usable item): those raise ValueError at construction. Every other problem skips the
item, adds one to ``dataset.skipped[reason]`` and logs one ``logging.warning`` line, once per item.
Reasons: ``missing_caption`` (no sidecar, empty or null caption), ``non_utf8_caption``,
``bad_record`` (malformed JSONL line, no ``video`` value, non-string caption) -- these are found at
construction, since captions are cheap to read -- and ``missing_file``, ``unreadable`` (cannot be
opened or has no video stream), ``truncated`` (decoding fails part-way), ``too_few_frames`` (fewer
source frames than ``num_frames``; videos are never looped) -- these are found lazily, when the item is
first loaded. ``__getitem__`` then returns the next valid item *of the same kind* (image or video, in
cyclic index order), so the image:video ratio of a sampler is kept; ``meta["index"]`` tells which item
was actually returned. ``scan()`` decodes everything up front instead, for clean index lists and
complete counts. With DataLoader workers each worker holds its own copy, so counts are per process.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp"})
VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif", ".wmv", ".flv"}
)
COLUMNS: tuple[str, str] = ("video", "caption")


class _Record(NamedTuple):
    path: Path
    caption: str
    is_image: bool


class SkipItem(Exception):
    """Raised internally when an item cannot be used; ``reason`` is the key counted in ``skipped``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------
# frame counts and indices
# ----------------------------------------------------------------------------------------------


def nearest_valid_num_frames(num_frames: int) -> int:
    """Nearest value of the form 1 + 8k (k >= 0), ties going up."""
    k = max(0, int(np.floor((num_frames - 1) / 8 + 0.5)))
    return 1 + 8 * k


def check_num_frames(num_frames: int) -> None:
    """Raise ValueError unless ``num_frames`` = 1 + 8k, the causal VAE's frame count (8x temporal)."""
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % 8 != 0:
        nearest = nearest_valid_num_frames(int(num_frames)) if isinstance(num_frames, int) else 1
        raise ValueError(
            f"num_frames must be 1 + 8k (1, 9, 17, ..., 57, ..., 121); got {num_frames!r}, "
            f"the nearest valid value is {nearest}."
        )


def frame_indices(total: int, num_frames: int, stride: int | None = None) -> list[int]:
    """Source frame indices to keep: ``num_frames`` evenly spaced over ``total`` frames.

    With ``stride`` set and the clip long enough, frames ``stride`` apart from a centred window are
    taken instead. Raises ``SkipItem("too_few_frames")`` when ``total < num_frames``.
    """
    if total < num_frames:
        raise SkipItem("too_few_frames", f"{total} frames, need {num_frames}")
    if stride is not None and 1 + (num_frames - 1) * stride <= total:
        first = (total - (1 + (num_frames - 1) * stride)) // 2
        return [first + k * stride for k in range(num_frames)]
    if num_frames == 1:
        return [0]
    return [int(np.floor(k * (total - 1) / (num_frames - 1) + 0.5)) for k in range(num_frames)]


# ----------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------


def resize_crop_size(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Resize (shorter side, aspect kept, covering the target) then centre-crop geometry.

    Returns ``(resized_h, resized_w, top, left)``.
    """
    scale = max(height / src_h, width / src_w)
    rh = max(height, int(round(src_h * scale)))
    rw = max(width, int(round(src_w * scale)))
    return rh, rw, (rh - height) // 2, (rw - width) // 2


def load_image(path: Path, height: int, width: int) -> np.ndarray:
    """Read an image as uint8 [1, height, width, 3] (resize shorter side + centre crop)."""
    if not path.exists():
        raise SkipItem("missing_file", "file does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except Exception as exc:  # PIL raises many types for corrupt files
        raise SkipItem("unreadable", f"{type(exc).__name__}: {exc}") from exc
    rh, rw, top, left = resize_crop_size(rgb.height, rgb.width, height, width)
    rgb = rgb.resize((rw, rh), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)[None, top : top + height, left : left + width]


def _decode(
    path: Path, height: int, width: int, num_frames: int, stride: int | None
) -> tuple[dict[int, np.ndarray], int, int]:
    """One decoding pass of ``path`` with PyAV.

    The container's announced frame count, when known, picks the frame indices to keep, and the pass
    stops once they are all converted; with no count known every frame is kept. Returns
    ``(resized+cropped frames by source index, frames decoded, announced count or 0)``.
    """
    import av  # imported where used: Moving Shapes and latent shards need no FFmpeg

    try:
        container = av.open(str(path))
    except Exception as exc:
        raise SkipItem("unreadable", f"{type(exc).__name__}: {exc}") from exc
    with container:
        if not container.streams.video:
            raise SkipItem("unreadable", "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        declared = int(stream.frames or 0)
        wanted = set(frame_indices(declared, num_frames, stride)) if declared > 0 else None
        kept: dict[int, np.ndarray] = {}
        count = 0
        try:
            for frame in container.decode(stream):
                if wanted is None or count in wanted:
                    rh, rw, top, left = resize_crop_size(frame.height, frame.width, height, width)
                    rgb = frame.to_ndarray(format="rgb24", width=rw, height=rh, interpolation="AREA")
                    kept[count] = rgb[top : top + height, left : left + width]
                count += 1
                if wanted is not None and len(kept) == len(wanted):
                    break
        except Exception as exc:
            raise SkipItem("truncated", f"decoding failed after {count} frames ({exc})") from exc
    if count == 0:
        raise SkipItem("unreadable", "no decodable frame")
    return kept, count, declared


def load_video(
    path: Path, height: int, width: int, num_frames: int, stride: int | None = None
) -> tuple[np.ndarray, list[int], int]:
    """Decode ``num_frames`` evenly spaced frames as uint8 [F, height, width, 3] with PyAV.

    Returns ``(frames, source frame indices, source frame count)``. When the container announces a
    frame count only the needed frames are converted, and a file that decodes fewer frames than it
    announces is ``truncated``; otherwise every frame is decoded first.
    """
    if not path.exists():
        raise SkipItem("missing_file", "file does not exist")
    kept, count, declared = _decode(path, height, width, num_frames, stride)
    total = declared if declared > 0 else count
    idx = frame_indices(total, num_frames, stride)
    if not all(i in kept for i in idx):
        raise SkipItem("truncated", f"the container announces {declared} frames, only {count} decode")
    return np.stack([kept[i] for i in idx]), idx, total


# ----------------------------------------------------------------------------------------------
# image:video mixing (paper D.1: 1:8)
# ----------------------------------------------------------------------------------------------


def _check_ratio(ratio: Sequence[int]) -> tuple[int, int]:
    if len(ratio) != 2 or any(int(r) != r or r < 0 for r in ratio) or sum(ratio) == 0:
        raise ValueError(f"image_video_ratio must be two non-negative integers, not both 0; got {ratio!r}.")
    return int(ratio[0]), int(ratio[1])


class _Pool:
    """Endless stream of a list's items, reshuffled each time it is used up."""

    def __init__(self, items: Sequence[int], rng: np.random.Generator) -> None:
        self.items = list(items)
        self.rng = rng
        self.order: list[int] = []

    def next(self) -> int:
        if not self.order:
            self.order = [self.items[k] for k in self.rng.permutation(len(self.items))]
        return self.order.pop()


def _kinds(
    image_indices: Sequence[int], video_indices: Sequence[int], count: int, ratio: Sequence[int], seed: int
) -> tuple[list[bool], _Pool, _Pool]:
    """``count`` kinds (True = image) in shuffled blocks of exactly ``a`` images and ``b`` videos."""
    a, b = _check_ratio(ratio)
    if not image_indices:
        a = 0
    if not video_indices:
        b = 0
    if a + b == 0:
        raise ValueError("image_video_ratio selects no item: the dataset has no item of the requested kinds.")
    rng = np.random.default_rng(seed)
    kinds: list[bool] = []
    while len(kinds) < count:
        block = np.array([True] * a + [False] * b)
        kinds.extend(bool(k) for k in block[rng.permutation(a + b)])
    return kinds[:count], _Pool(image_indices, rng), _Pool(video_indices, rng)


def mixed_indices(
    image_indices: Sequence[int],
    video_indices: Sequence[int],
    num_samples: int,
    ratio: Sequence[int] = (1, 8),
    seed: int = 0,
) -> list[int]:
    """``num_samples`` item indices, images and videos in ``ratio`` (a:b).

    Draws come in shuffled blocks of exactly ``a`` images and ``b`` videos; within each kind the items
    are visited in reshuffled epochs. A kind with no item is dropped (all draws from the other kind).
    """
    kinds, images, videos = _kinds(image_indices, video_indices, num_samples, ratio, seed)
    return [images.next() if k else videos.next() for k in kinds]


def mixed_batches(
    image_indices: Sequence[int],
    video_indices: Sequence[int],
    batch_size: int,
    num_batches: int,
    ratio: Sequence[int] = (1, 8),
    seed: int = 0,
) -> list[list[int]]:
    """``num_batches`` batches, each all-image or all-video, the batch kinds in ``ratio`` (a:b).

    Homogeneous batches can be stacked (images have 1 frame, videos ``num_frames``); pass the result
    as ``DataLoader(batch_sampler=...)``. With equal batch sizes the item ratio equals ``ratio``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    kinds, images, videos = _kinds(image_indices, video_indices, num_batches, ratio, seed)
    return [[(images if k else videos).next() for _ in range(batch_size)] for k in kinds]


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``video`` tensors into [B, 3, F, H, W]; every other key becomes a list (captions, meta)."""
    if not batch:
        raise ValueError("collate got an empty batch.")
    shapes = {tuple(item["video"].shape) for item in batch}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot stack videos of different shapes {sorted(shapes)}; batch images and videos "
            "separately (see mixed_batches)."
        )
    out: dict[str, Any] = {"video": torch.stack([item["video"] for item in batch])}
    for key in batch[0]:
        if key != "video":
            out[key] = [item[key] for item in batch]
    return out


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------


def _is_utf8(text: str) -> bool:
    """False when ``text`` holds bytes smuggled in by the surrogateescape error handler."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _read_folder(folder: Path) -> tuple[list[_Record], list[tuple[str, str, str]]]:
    records: list[_Record] = []
    skips: list[tuple[str, str, str]] = []  # (where, reason, detail)
    media = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
    )
    for path in media:
        sidecar = path.with_suffix(".txt")
        if not sidecar.is_file():
            skips.append((str(path), "missing_caption", f"no caption file {sidecar.name}"))
            continue
        try:
            caption = sidecar.read_bytes().decode("utf-8-sig").strip()
        except UnicodeDecodeError as exc:
            skips.append((str(path), "non_utf8_caption", f"{sidecar.name} is not UTF-8 ({exc.reason})"))
            continue
        if not caption:
            skips.append((str(path), "missing_caption", f"{sidecar.name} is empty"))
            continue
        records.append(_Record(path, caption, _is_image(path)))
    return records, skips


def _make_record(
    raw_video: Any, raw_caption: Any, base: Path, where: str
) -> tuple[_Record | None, tuple[str, str, str] | None]:
    if not isinstance(raw_video, str) or not raw_video.strip():
        return None, (where, "bad_record", "no video path")
    path = Path(raw_video.strip())
    path = path if path.is_absolute() else base / path
    if raw_caption is None or (isinstance(raw_caption, str) and not raw_caption.strip()):
        return None, (f"{where} ({path})", "missing_caption", "empty caption")
    if not isinstance(raw_caption, str):
        return None, (f"{where} ({path})", "bad_record", f"caption is a {type(raw_caption).__name__}")
    if not _is_utf8(raw_caption):
        return None, (f"{where} ({path})", "non_utf8_caption", "caption bytes are not UTF-8")
    return _Record(path, raw_caption.strip(), _is_image(path)), None


def _read_csv(source: Path, base: Path) -> tuple[list[_Record], list[tuple[str, str, str]]]:
    records: list[_Record] = []
    skips: list[tuple[str, str, str]] = []
    with open(source, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle)
        found = [name.strip() for name in reader.fieldnames or []]
        if not set(COLUMNS) <= set(found):
            raise ValueError(
                f"CSV source {source} must have the columns 'video' and 'caption' in its header; "
                f"found {found}."
            )
        reader.fieldnames = found
        for row_number, row in enumerate(reader, start=2):
            record, skip = _make_record(row.get("video"), row.get("caption"), base, f"{source}:{row_number}")
            if record is not None:
                records.append(record)
            if skip is not None:
                skips.append(skip)
    return records, skips


def _read_jsonl(source: Path, base: Path) -> tuple[list[_Record], list[tuple[str, str, str]]]:
    records: list[_Record] = []
    skips: list[tuple[str, str, str]] = []
    objects: list[tuple[str, dict[str, Any]]] = []
    for line_number, raw in enumerate(source.read_bytes().splitlines(), start=1):
        where = f"{source}:{line_number}"
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as exc:
            skips.append((where, "bad_record", f"invalid JSON ({exc.msg})"))
            continue
        if not isinstance(obj, dict):
            skips.append((where, "bad_record", f"a line must hold a JSON object, got {type(obj).__name__}"))
            continue
        objects.append((where, obj))
    for key in COLUMNS:
        if objects and not any(key in obj for _, obj in objects):
            raise ValueError(
                f"JSONL source {source} must have the keys 'video' and 'caption' on each line; "
                f"no line has {key!r} (first line's keys: {sorted(objects[0][1])})."
            )
    for where, obj in objects:
        record, skip = _make_record(obj.get("video"), obj.get("caption"), base, where)
        if record is not None:
            records.append(record)
        if skip is not None:
            skips.append(skip)
    return records, skips


# ----------------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------------


class VideoTextDataset(torch.utils.data.Dataset):
    """Text-video pairs from a folder, CSV or JSONL source, as 1 + 8k-frame clips (paper D.1).

    Item: ``{"video": float [3, F, H, W] in [-1, 1], "caption": str, "meta": {"path", "kind",
    "index", "frame_indices", "source_frames"}}``; images have F = 1 (kind "image"), videos
    F = ``num_frames``. Frames are resized (shorter side, aspect kept) and centre-cropped to
    ``height`` x ``width``; ``num_frames`` evenly spaced source frames are taken (or, with
    ``frame_stride``, frames that far apart from a centred window when the clip is long enough).
    Bad items are skipped and counted in ``skipped`` (see the module docstring). Use
    ``mixed_batches``/``mixed_indices`` for the image:video ratio and ``collate`` to batch.
    """

    def __init__(
        self,
        source: str | Path,
        height: int,
        width: int,
        num_frames: int,
        image_video_ratio: Sequence[int] = (1, 8),
        root: str | Path | None = None,
        frame_stride: int | None = None,
    ) -> None:
        check_num_frames(num_frames)
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be positive; got {height}x{width}.")
        if frame_stride is not None and frame_stride < 1:
            raise ValueError(f"frame_stride must be None or at least 1; got {frame_stride}.")
        self.image_video_ratio = _check_ratio(image_video_ratio)
        self.source = Path(source)
        self.height = height
        self.width = width
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.skipped: Counter[str] = Counter()
        self._bad: set[int] = set()
        base = Path(root) if root is not None else self.source.parent
        if self.source.is_dir():
            records, skips = _read_folder(self.source)
        elif self.source.is_file() and self.source.suffix.lower() == ".csv":
            records, skips = _read_csv(self.source, base)
        elif self.source.is_file() and self.source.suffix.lower() == ".jsonl":
            records, skips = _read_jsonl(self.source, base)
        elif not self.source.exists():
            raise ValueError(f"source {self.source} does not exist; give a folder, a .csv or a .jsonl file.")
        else:
            raise ValueError(f"source {self.source} must be a folder, a .csv or a .jsonl file.")
        for where, reason, detail in skips:
            self._log_skip(where, reason, detail)
        if not records:
            raise ValueError(f"source {self.source} has no usable item (skipped: {dict(self.skipped)}).")
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_indices(self) -> list[int]:
        """Indices of image items not known to be bad."""
        return [i for i, r in enumerate(self.records) if r.is_image and i not in self._bad]

    @property
    def video_indices(self) -> list[int]:
        """Indices of video items not known to be bad."""
        return [i for i, r in enumerate(self.records) if not r.is_image and i not in self._bad]

    def mixed_indices(self, num_samples: int, seed: int = 0) -> list[int]:
        """Item indices with images and videos in ``image_video_ratio`` (see ``mixed_indices``)."""
        images, videos = self.image_indices, self.video_indices
        return mixed_indices(images, videos, num_samples, self.image_video_ratio, seed)

    def mixed_batches(self, batch_size: int, num_batches: int, seed: int = 0) -> list[list[int]]:
        """Homogeneous batches in ``image_video_ratio`` (see ``mixed_batches``)."""
        return mixed_batches(
            self.image_indices, self.video_indices, batch_size, num_batches, self.image_video_ratio, seed
        )

    def _log_skip(self, where: str, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        logger.warning("skipping %s: %s (%s)", where, reason, detail)

    def load(self, index: int) -> dict[str, Any]:
        """Load item ``index`` or raise ``SkipItem`` (no fallback, no counting)."""
        record = self.records[index]
        if record.is_image:
            frames = load_image(record.path, self.height, self.width)
            idx, total = [0], 1
        else:
            frames, idx, total = load_video(
                record.path, self.height, self.width, self.num_frames, self.frame_stride
            )
        video = torch.from_numpy(np.ascontiguousarray(frames.transpose(3, 0, 1, 2)))
        return {
            "video": video.float().div_(127.5).sub_(1.0),
            "caption": record.caption,
            "meta": {
                "path": str(record.path),
                "kind": "image" if record.is_image else "video",
                "index": index,
                "frame_indices": idx,
                "source_frames": total,
            },
        }

    def _try(self, index: int) -> dict[str, Any] | None:
        if index in self._bad:
            return None
        try:
            return self.load(index)
        except SkipItem as skip:
            self._bad.add(index)
            self._log_skip(f"item {index} ({self.records[index].path})", skip.reason, skip.detail)
            return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        index %= len(self)
        item = self._try(index)
        if item is not None:
            return item
        kind = self.records[index].is_image
        same = [i for i, r in enumerate(self.records) if r.is_image == kind]
        start = same.index(index)
        for k in range(1, len(same)):
            item = self._try(same[(start + k) % len(same)])
            if item is not None:
                return item
        name = "image" if kind else "video"
        raise RuntimeError(f"no readable {name} item in {self.source} (skipped: {dict(self.skipped)}).")

    def scan(self) -> Counter[str]:
        """Decode every item now, marking the bad ones; returns ``skipped``. Costs a full decode pass."""
        for index in range(len(self)):
            self._try(index)
        return self.skipped
