"""Moving Shapes: a synthetic text-to-video dataset with exact captions (training data, paper D.1).

Every clip shows one or two flat shapes moving at constant velocity over a plain background, and its
caption is generated from the same specification, so a model's output can be checked exactly.

Conventions
-----------
* Colours (RGB, chosen to be far apart so a nearest-colour segmenter recovers them; the smallest
  pairwise distance between any two object/background colours is about 127):
  red (255, 0, 0), green (0, 255, 0), blue (0, 0, 255), yellow (255, 255, 0), purple (160, 0, 160),
  orange (255, 128, 0), cyan (0, 255, 255), white (255, 255, 255).
  Backgrounds: black (0, 0, 0), white (255, 255, 255), gray (128, 128, 128).
  An object never has its background's colour, and the two objects of a clip have different colours.
* Geometry is in pixels, x to the right and y downwards; "up" means decreasing y. An object's
  ``size_px`` is the side of its bounding square (circle diameter, square side, triangle base and
  height); "small" is 0.15 and "big" 0.30 of ``min(height, width)``. ``start`` is the centre of the
  bounding square at frame 0 and ``velocity`` the displacement per frame, so the centre at frame t is
  ``start + t * velocity``. Shapes are crisp: a pixel is inside when its centre is; when rendering,
  the bounding square's top-left corner is snapped to a whole pixel, so every frame shows an exact
  translate of the same stamp (constant area; slow objects move in whole-pixel steps).
* Speed is drawn in [0.02, 0.04] of the frame extent along the motion axis per frame, reduced when
  needed so that the whole bounding square stays inside the frame for the whole clip.
* Held-out split: every clip containing a green triangle, a purple circle or an orange square is
  held out; ``split="train"`` never contains one, ``split="heldout"`` always contains at least one.
* Item ``i`` of ``MovingShapes`` is a pure function of ``(seed, i)`` (and the constructor arguments):
  it uses ``numpy.random.default_rng([seed, i])``.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (160, 0, 160),
    "orange": (255, 128, 0),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "big")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
SPLITS: tuple[str, ...] = ("train", "heldout", "all")

SIZE_FRACTION: dict[str, float] = {"small": 0.15, "big": 0.30}
SPEED_FRACTION: tuple[float, float] = (0.02, 0.04)
MOTION_PHRASE: dict[str, str] = {
    "left": "moving to the left",
    "right": "moving to the right",
    "up": "moving up",
    "down": "moving down",
    "still": "staying still",
}
MOTION_DIRECTION: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "still": (0, 0),
}
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("green", "triangle"), ("purple", "circle"), ("orange", "square")}
)

_OBJECT_PATTERN = (
    rf"a (?P<size{{k}}>{'|'.join(SIZES)}) (?P<colour{{k}}>{'|'.join(COLOURS)}) "
    rf"(?P<shape{{k}}>{'|'.join(SHAPES)}) (?P<motion{{k}}>{'|'.join(MOTION_PHRASE.values())})"
)
CAPTION_REGEX: re.Pattern[str] = re.compile(
    "^"
    + _OBJECT_PATTERN.format(k=0)
    + "(?: and "
    + _OBJECT_PATTERN.format(k=1)
    + rf")? on a (?P<background>{'|'.join(BACKGROUNDS)}) background$"
)
"""Regex of the canonical caption grammar (one or two objects)."""

_PHRASE_TO_MOTION = {phrase: motion for motion, phrase in MOTION_PHRASE.items()}
_MIN_SIDE = 8


# ----------------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------------


def _object_phrase(obj: dict[str, Any], with_size: bool = True) -> str:
    size = f"{obj['size']} " if with_size else ""
    return f"a {size}{obj['colour']} {obj['shape']} {MOTION_PHRASE[obj['motion']]}"


def _meta_of(sample: dict[str, Any]) -> dict[str, Any]:
    return sample["meta"] if "meta" in sample else sample


def canonical_caption(sample: dict[str, Any]) -> str:
    """Canonical caption, e.g. "a big red circle moving to the right on a black background".

    ``sample`` is a dataset item or its ``meta`` (only colour/shape/size/motion/background are used).
    """
    meta = _meta_of(sample)
    objects = " and ".join(_object_phrase(o) for o in meta["objects"])
    return f"{objects} on a {meta['background']} background"


def captions(sample: dict[str, Any]) -> list[str]:
    """All captions of a sample: the canonical one first, then a few paraphrases (no duplicates)."""
    meta = _meta_of(sample)
    bg = meta["background"]
    with_size = " and ".join(_object_phrase(o) for o in meta["objects"])
    no_size = " and ".join(_object_phrase(o, with_size=False) for o in meta["objects"])
    out = [
        f"{with_size} on a {bg} background",
        f"{no_size} on a {bg} background",
        f"a {bg} background with {with_size}",
        f"a video of {with_size} on a {bg} background",
        f"{with_size}, {bg} background",
    ]
    return list(dict.fromkeys(out))


def parse_caption(caption: str) -> dict[str, Any] | None:
    """Parse a canonical caption into ``{"background", "objects": [{colour, shape, size, motion}]}``.

    Returns None when ``caption`` does not follow the canonical grammar.
    """
    match = CAPTION_REGEX.match(caption.strip())
    if match is None:
        return None
    objects = []
    for k in range(2):
        if match.group(f"colour{k}") is None:
            continue
        objects.append(
            {
                "colour": match.group(f"colour{k}"),
                "shape": match.group(f"shape{k}"),
                "size": match.group(f"size{k}"),
                "motion": _PHRASE_TO_MOTION[match.group(f"motion{k}")],
            }
        )
    return {"background": match.group("background"), "objects": objects}


def is_heldout(sample: dict[str, Any]) -> bool:
    """True when any object of the sample is a held-out (colour, shape) pair."""
    return any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in _meta_of(sample)["objects"])


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------


def object_size_px(size: str, height: int, width: int) -> float:
    """Side of the bounding square of a "small"/"big" object, in pixels (at least 2)."""
    return max(2.0, SIZE_FRACTION[size] * min(height, width))


def _check_resolution(height: int, width: int, num_frames: int) -> None:
    if height < _MIN_SIDE or width < _MIN_SIDE:
        raise ValueError(f"height and width must be at least {_MIN_SIDE} pixels; got {height}x{width}.")
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1; got {num_frames}.")


def _place(
    obj: dict[str, Any], height: int, width: int, num_frames: int, rng: np.random.Generator | None
) -> dict[str, Any]:
    """Choose start and velocity so that the bounding square stays inside the frame for every frame.

    With ``rng=None`` the placement is canonical: the trajectory is centred in the frame and the speed
    is the middle of ``SPEED_FRACTION`` (capped by the room available).
    """
    obj = dict(obj)
    s = float(obj.get("size_px", object_size_px(obj["size"], height, width)))
    obj["size_px"] = s
    dx, dy = MOTION_DIRECTION[obj["motion"]]
    extent = (float(width), float(height))
    direction = (dx, dy)
    start = [0.0, 0.0]
    velocity = [0.0, 0.0]
    for axis in range(2):
        lo, hi = s / 2, extent[axis] - s / 2
        d = direction[axis]
        if d == 0:
            start[axis] = (lo + hi) / 2 if rng is None else float(rng.uniform(lo, hi))
            continue
        frac = float(np.mean(SPEED_FRACTION)) if rng is None else float(rng.uniform(*SPEED_FRACTION))
        speed = frac * extent[axis]
        if num_frames > 1:
            speed = min(speed, (hi - lo) / (num_frames - 1))
        travel = speed * (num_frames - 1)
        if rng is None:
            first = (lo + hi) / 2 - d * travel / 2
        else:
            room = max(0.0, hi - lo - travel)  # >= 0 up to rounding
            offset = float(rng.uniform(0.0, room))
            first = lo + offset if d > 0 else hi - offset
        start[axis] = first
        velocity[axis] = d * speed
    obj["start"] = (start[0], start[1])
    obj["velocity"] = (velocity[0], velocity[1])
    return obj


def _overlap(objects: list[dict[str, Any]], num_frames: int, margin: float = 1.0) -> bool:
    """True when the bounding squares of any two objects come within ``margin`` pixels at some frame."""
    t = np.arange(num_frames, dtype=np.float64)
    for a in range(len(objects)):
        for b in range(a + 1, len(objects)):
            oa, ob = objects[a], objects[b]
            gap = (oa["size_px"] + ob["size_px"]) / 2 + margin
            close = np.ones(num_frames, dtype=bool)
            for axis in range(2):
                ca = oa["start"][axis] + t * oa["velocity"][axis]
                cb = ob["start"][axis] + t * ob["velocity"][axis]
                close &= np.abs(ca - cb) < gap
            if close.any():
                return True
    return False


def complete_meta(
    meta: dict[str, Any],
    height: int,
    width: int,
    num_frames: int,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Return a copy of ``meta`` where objects lacking ``size_px``/``start``/``velocity`` get them.

    Objects that already have ``start`` and ``velocity`` are kept as they are (pixels at the given
    resolution). Missing placements are drawn from ``rng`` (avoiding overlaps when cheap) or, with
    ``rng=None``, placed canonically (see ``_place``; several objects are then spread across the axis
    perpendicular to their motion).
    """
    _check_resolution(height, width, num_frames)
    meta = copy.deepcopy(meta)
    objects = meta["objects"]
    todo = [k for k, o in enumerate(objects) if "start" not in o or "velocity" not in o]
    if not todo:
        return meta
    if rng is not None:
        for _ in range(10):
            for k in todo:
                objects[k] = _place(objects[k], height, width, num_frames, rng)
            if not _overlap(objects, num_frames):
                break
        return meta
    for rank, k in enumerate(todo):
        obj = _place(objects[k], height, width, num_frames, None)
        if len(todo) > 1:
            _, dy = MOTION_DIRECTION[obj["motion"]]
            perp = 0 if dy != 0 else 1  # vertical motion: spread along x, otherwise along y
            extent = (width, height)[perp]
            lo, hi = obj["size_px"] / 2, extent - obj["size_px"] / 2
            pos = lo + (hi - lo) * (rank + 1) / (len(todo) + 1)
            start = list(obj["start"])
            start[perp] = pos
            obj["start"] = (start[0], start[1])
        objects[k] = obj
    return meta


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, s: float) -> np.ndarray:
    """Boolean mask over pixel centres ``xs`` (1, w) and ``ys`` (h, 1)."""
    half = s / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":  # upward-pointing: apex at the top centre, base at the bottom
        top = cy - half
        return (ys >= top) & (ys <= cy + half) & (np.abs(xs - cx) <= (ys - top) / 2)
    raise ValueError(f"shape must be one of {SHAPES}; got {shape!r}.")


def _snap(centre: float, size: float, extent: int) -> float:
    """Centre whose bounding-square corner is on the nearest whole pixel.

    The clamp (no pixel centre beyond ``extent``) only acts in the exact-tie case; for a square inside
    ``[0, extent]`` rounding the corner never pushes a covered pixel centre out of the frame.
    """
    corner = np.floor(centre - size / 2 + 0.5)
    corner = min(max(corner, 0.0), max(0.0, np.ceil(extent + 0.5 - size) - 1.0))
    return float(corner + size / 2)


def _render_channels_first(meta: dict[str, Any], height: int, width: int, num_frames: int) -> np.ndarray:
    """Render a specification to uint8 [3, F, H, W] (objects drawn in list order, later on top)."""
    meta = complete_meta(meta, height, width, num_frames)
    if meta["background"] not in BACKGROUND_RGB:
        raise ValueError(f"background must be one of {BACKGROUNDS}; got {meta['background']!r}.")
    video = np.empty((3, num_frames, height, width), dtype=np.uint8)
    for c, value in enumerate(BACKGROUND_RGB[meta["background"]]):
        video[c] = value
    for obj in meta["objects"]:
        if obj["colour"] not in COLOUR_RGB:
            raise ValueError(f"colour must be one of {COLOURS}; got {obj['colour']!r}.")
        rgb = COLOUR_RGB[obj["colour"]]
        s = obj["size_px"]
        for t in range(num_frames):
            cx = _snap(obj["start"][0] + t * obj["velocity"][0], s, width)
            cy = _snap(obj["start"][1] + t * obj["velocity"][1], s, height)
            x0, x1 = max(0, int(np.floor(cx - s / 2))), min(width, int(np.ceil(cx + s / 2)) + 1)
            y0, y1 = max(0, int(np.floor(cy - s / 2))), min(height, int(np.ceil(cy + s / 2)) + 1)
            if x0 >= x1 or y0 >= y1:
                continue
            xs = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
            ys = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
            mask = _shape_mask(obj["shape"], xs, ys, cx, cy, s)
            for c in range(3):
                video[c, t, y0:y1, x0:x1][mask] = rgb[c]
    return video


def render_frames(meta: dict[str, Any], height: int, width: int, num_frames: int) -> np.ndarray:
    """Render a specification to uint8 frames of shape [F, H, W, 3] (see ``render``)."""
    return np.ascontiguousarray(_render_channels_first(meta, height, width, num_frames).transpose(1, 2, 3, 0))


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] -> float32 video [3, F, H, W] in [-1, 1]."""
    return _to_float(np.ascontiguousarray(frames.transpose(3, 0, 1, 2)))


def _to_float(video: np.ndarray) -> torch.Tensor:
    """uint8 [3, F, H, W] -> float32 in [-1, 1]."""
    return torch.from_numpy(video).float().div_(127.5).sub_(1.0)


def render(meta: dict[str, Any], height: int, width: int, num_frames: int) -> torch.Tensor:
    """Render a specification to a float video [3, F, H, W] in [-1, 1].

    ``meta`` needs ``background`` and ``objects`` (colour, shape, size, motion); objects without
    ``start``/``velocity`` are placed canonically (see ``complete_meta``).
    """
    return _to_float(_render_channels_first(meta, height, width, num_frames))


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------


def _draw_object(
    rng: np.random.Generator, background: str, taken: set[str], pairs: list[tuple[str, str]] | None
) -> dict[str, Any]:
    """Draw one object whose colour is neither the background nor in ``taken``.

    ``pairs`` restricts (colour, shape) to that list; ``None`` allows every pair.
    """
    if pairs is not None:
        allowed = [p for p in pairs if p[0] != background and p[0] not in taken]
        colour, shape = allowed[int(rng.integers(len(allowed)))]
    else:
        colours = [c for c in COLOURS if c != background and c not in taken]
        colour = colours[int(rng.integers(len(colours)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return {
        "colour": colour,
        "shape": shape,
        "size": SIZES[int(rng.integers(len(SIZES)))],
        "motion": MOTIONS[int(rng.integers(len(MOTIONS)))],
    }


def sample_meta(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_frames: int,
    split: str = "all",
    max_objects: int = 2,
) -> dict[str, Any]:
    """Draw a full clip specification (background, objects with placement) for the given split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2; got {max_objects}.")
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    num_objects = int(rng.integers(1, max_objects + 1))
    train_pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]
    objects: list[dict[str, Any]] = []
    if split == "heldout":
        objects.append(_draw_object(rng, background, set(), sorted(HELDOUT_PAIRS)))
    while len(objects) < num_objects:
        taken = {o["colour"] for o in objects}
        pairs = train_pairs if split == "train" else None
        objects.append(_draw_object(rng, background, taken, pairs))
    order = rng.permutation(len(objects))
    meta = {"background": background, "objects": [objects[k] for k in order]}
    return complete_meta(meta, height, width, num_frames, rng)


def heldout_prompts(seeds_per_prompt: int = 2, sizes: tuple[str, ...] = ("big",)) -> list[dict[str, Any]]:
    """Evaluation prompts: every held-out (colour, shape) pair x every motion x every background.

    One object per prompt; ``sizes`` defaults to ("big",) only, because big objects are easier to
    analyse in generated videos (3 pairs x 5 motions x 3 backgrounds = 45 prompts). Pairs whose colour
    equals the background are skipped. Each prompt is repeated with seeds ``0 .. seeds_per_prompt-1``.
    Returns dicts ``{"prompt": str, "seed": int, "meta": {"background", "objects": [...]}}`` where the
    object has colour/shape/size/motion (no placement; ``render`` places it canonically).
    """
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be at least 1; got {seeds_per_prompt}.")
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        raise ValueError(f"sizes must be a non-empty subset of {SIZES}; got {sizes!r}.")
    out: list[dict[str, Any]] = []
    for colour, shape in sorted(HELDOUT_PAIRS):
        for size in sizes:
            for motion in MOTIONS:
                for background in BACKGROUNDS:
                    if colour == background:
                        continue
                    obj = {"colour": colour, "shape": shape, "size": size, "motion": motion}
                    meta = {"background": background, "objects": [obj]}
                    prompt = canonical_caption(meta)
                    for seed in range(seeds_per_prompt):
                        out.append({"prompt": prompt, "seed": seed, "meta": copy.deepcopy(meta)})
    return out


class MovingShapes(Dataset):
    """Deterministic synthetic text-to-video dataset of moving shapes with exact captions (paper D.1).

    Item ``i``: ``{"video": float [3, F, H, W] in [-1, 1], "caption": str, "meta": dict}``. ``meta``
    holds ``background``, ``objects`` (colour, shape, size, motion, size_px, start, velocity),
    ``height``, ``width``, ``num_frames``, ``index`` and ``canonical_caption``. ``caption`` is the
    canonical caption, except that with probability ``paraphrase_prob`` it is one of the paraphrases
    of ``captions`` (drawn from a separate generator so the video does not depend on it).
    Batch with ``m4v.data.collate`` (the default collate cannot batch the per-object lists).
    """

    def __init__(
        self,
        num_samples: int,
        height: int,
        width: int,
        num_frames: int,
        seed: int = 0,
        split: str = "train",
        max_objects: int = 2,
        paraphrase_prob: float = 0.0,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be non-negative; got {num_samples}.")
        _check_resolution(height, width, num_frames)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
        if max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2; got {max_objects}.")
        if not 0.0 <= paraphrase_prob <= 1.0:
            raise ValueError(f"paraphrase_prob must be in [0, 1]; got {paraphrase_prob}.")
        self.num_samples = num_samples
        self.height = height
        self.width = width
        self.num_frames = num_frames
        self.seed = seed
        self.split = split
        self.max_objects = max_objects
        self.paraphrase_prob = paraphrase_prob

    def __len__(self) -> int:
        return self.num_samples

    def meta(self, index: int) -> dict[str, Any]:
        """Specification of item ``index`` without rendering it."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for MovingShapes of length {self.num_samples}")
        rng = np.random.default_rng([self.seed, index])
        meta = sample_meta(rng, self.height, self.width, self.num_frames, self.split, self.max_objects)
        meta.update(
            height=self.height,
            width=self.width,
            num_frames=self.num_frames,
            index=index,
            canonical_caption=canonical_caption(meta),
        )
        return meta

    def __getitem__(self, index: int) -> dict[str, Any]:
        meta = self.meta(index)
        caption = meta["canonical_caption"]
        if self.paraphrase_prob > 0:
            crng = np.random.default_rng([self.seed, index, 1])
            if crng.random() < self.paraphrase_prob:
                alternatives = captions(meta)[1:]
                caption = alternatives[int(crng.integers(len(alternatives)))]
        video = render(meta, self.height, self.width, self.num_frames)
        return {"video": video, "caption": caption, "meta": meta}
