"""Tests for the Moving Shapes synthetic dataset (m4v.data.moving_shapes)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from m4v.data import collate
from m4v.data.moving_shapes import (
    MovingShapes,
    captions,
    heldout_prompts,
    parse_caption,
    render,
    render_frames,
)

# Independent copies of the documented vocabulary and colour table.
RGB = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (160, 0, 160),
    "orange": (255, 128, 0),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
BG = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
HELD = {("green", "triangle"), ("purple", "circle"), ("orange", "square")}
PHRASES = {
    "moving to the right": "right",
    "moving to the left": "left",
    "moving up": "up",
    "moving down": "down",
    "staying still": "still",
}
OBJ = (
    r"a (small|big) (red|green|blue|yellow|purple|orange|cyan|white) (circle|square|triangle) "
    r"(moving to the right|moving to the left|moving up|moving down|staying still)"
)
GRAMMAR = re.compile(rf"^{OBJ}(?: and {OBJ})? on a (black|white|gray) background$")


def _frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return np.rint((video.permute(1, 2, 3, 0).numpy().astype(np.float64) + 1.0) * 127.5).astype(np.int64)


def _mask(frames: np.ndarray, colour: str) -> np.ndarray:
    return np.all(frames == np.asarray(RGB[colour]), axis=-1)


def _objects_of(caption: str) -> tuple[list[tuple[str, str, str, str]], str]:
    m = GRAMMAR.match(caption)
    assert m is not None, caption
    groups = m.groups()
    objs = [groups[0:4]]
    if groups[4] is not None:
        objs.append(groups[4:8])
    return [(s, c, sh, PHRASES[mo]) for s, c, sh, mo in objs], groups[8]


def test_determinism() -> None:
    a = MovingShapes(20, 32, 48, 9, seed=3)
    b = MovingShapes(20, 32, 48, 9, seed=3)
    c = MovingShapes(20, 32, 48, 9, seed=4)
    # access order must not matter: item i depends only on (seed, i)
    first = [a[i] for i in (5, 2, 7)]
    second = [b[i] for i in (7, 2, 5)][::-1]
    for x, y in zip(first, second):
        assert torch.equal(x["video"], y["video"]) and x["caption"] == y["caption"]
    assert not torch.equal(a[5]["video"], a[6]["video"])
    diff = sum(not torch.equal(a[i]["video"], c[i]["video"]) for i in range(10))
    assert diff == 10


def test_caption_grammar_and_consistency_with_pixels() -> None:
    ds = MovingShapes(60, 32, 48, 9, seed=0, split="all")
    n_two = 0
    for i in range(len(ds)):
        item = ds[i]
        video = item["video"]
        assert video.shape == (3, 9, 32, 48) and video.dtype == torch.float32
        assert video.min() >= -1 and video.max() <= 1
        objs, bg = _objects_of(item["caption"])
        n_two += len(objs) == 2
        assert item["caption"] == captions(item)[0] == item["meta"]["canonical_caption"]
        meta_objs = [(o["size"], o["colour"], o["shape"], o["motion"]) for o in item["meta"]["objects"]]
        assert meta_objs == objs and item["meta"]["background"] == bg
        assert parse_caption(item["caption"]) == {
            "background": bg,
            "objects": [dict(zip(("size", "colour", "shape", "motion"), o)) for o in objs],
        }
        frames = _frames(video)
        colours = {tuple(int(v) for v in p) for p in np.unique(frames.reshape(-1, 3), axis=0)}
        expected = {BG[bg]} | {RGB[o[1]] for o in objs}
        assert colours <= expected and BG[bg] in colours
        for _, colour, _, _ in objs:
            assert RGB[colour] != BG[bg], "object has its background's colour"
            assert _mask(frames, colour).any(axis=(1, 2)).all(), "object invisible in some frame"
        if len(objs) == 2:
            assert objs[0][1] != objs[1][1]
    assert 10 < n_two < 50


def test_paraphrases_do_not_change_video() -> None:
    plain = MovingShapes(12, 24, 24, 5, seed=1)
    para = MovingShapes(12, 24, 24, 5, seed=1, paraphrase_prob=1.0)
    for i in range(12):
        a, b = plain[i], para[i]
        assert torch.equal(a["video"], b["video"])
        assert GRAMMAR.match(a["caption"]) and b["caption"] != a["caption"]
        assert b["caption"] in captions(a)[1:]
        assert b["meta"]["canonical_caption"] == a["caption"]


def test_heldout_exclusion() -> None:
    train = MovingShapes(400, 16, 16, 1, seed=7, split="train")
    held = MovingShapes(150, 16, 16, 1, seed=7, split="heldout")
    everything = MovingShapes(400, 16, 16, 1, seed=7, split="all")
    pairs = lambda m: {(o["colour"], o["shape"]) for o in m["objects"]}  # noqa: E731
    for i in range(len(train)):
        objs, _ = _objects_of(train.meta(i)["canonical_caption"])
        assert not {(c, s) for _, c, s, _ in objs} & HELD
        assert not pairs(train.meta(i)) & HELD
    seen = set()
    for i in range(len(held)):
        p = pairs(held.meta(i))
        assert p & HELD
        seen |= p & HELD
    assert seen == HELD
    assert any(pairs(everything.meta(i)) & HELD for i in range(len(everything)))


def test_objects_stay_in_frame_and_still_objects_do_not_move() -> None:
    for h, w, f in [(32, 48, 9), (40, 24, 17), (64, 64, 57)]:
        ds = MovingShapes(40, h, w, f, seed=2)
        for i in range(len(ds)):
            meta = ds.meta(i)
            for o in meta["objects"]:
                t = np.arange(f)
                cx = o["start"][0] + t * o["velocity"][0]
                cy = o["start"][1] + t * o["velocity"][1]
                half = o["size_px"] / 2
                assert np.all(cx - half >= -1e-9) and np.all(cx + half <= w + 1e-9)
                assert np.all(cy - half >= -1e-9) and np.all(cy + half <= h + 1e-9)
                if o["motion"] == "still":
                    assert o["velocity"] == (0.0, 0.0)
            # render on a padded canvas: nothing may fall outside the original frame
            pad = 6
            shifted = {
                "background": meta["background"],
                "objects": [
                    dict(o, start=(o["start"][0] + pad, o["start"][1] + pad)) for o in meta["objects"]
                ],
            }
            big = render_frames(shifted, h + 2 * pad, w + 2 * pad, f).astype(np.int64)
            outside = np.ones(big.shape[:3], dtype=bool)
            outside[:, pad : pad + h, pad : pad + w] = False
            assert np.all(big[outside] == np.asarray(BG[meta["background"]]))
            assert np.array_equal(big[:, pad : pad + h, pad : pad + w], render_frames(meta, h, w, f))


def test_motion_direction_from_colour_centroids() -> None:
    ds = MovingShapes(80, 32, 48, 9, seed=5, max_objects=1)
    motions = set()
    for i in range(len(ds)):
        item = ds[i]
        (size, colour, shape, motion), = _objects_of(item["caption"])[0]
        motions.add(motion)
        mask = _mask(_frames(item["video"]), colour)
        ys, xs = np.mgrid[0:32, 0:48]
        area = mask.sum(axis=(1, 2))
        assert np.all(area == area[0]), "object clipped or deformed"
        ref = np.argwhere(mask[0])
        for m in mask[1:]:  # every frame is a whole-pixel translate of the first one
            pts = np.argwhere(m)
            assert np.array_equal(pts - pts[0], ref - ref[0])
        cx = (mask * xs).sum(axis=(1, 2)) / area
        cy = (mask * ys).sum(axis=(1, 2)) / area
        dx, dy = cx[-1] - cx[0], cy[-1] - cy[0]
        if motion == "still":
            assert dx == 0 and dy == 0
            assert all(np.array_equal(mask[0], m) for m in mask)
        elif motion in ("left", "right"):
            assert abs(dy) <= 1.0 and abs(dx) >= 3.0
            assert (dx > 0) == (motion == "right")
            assert np.all(np.diff(cx) * np.sign(dx) >= -0.5)
        else:
            assert abs(dx) <= 1.0 and abs(dy) >= 3.0
            assert (dy > 0) == (motion == "down")  # image y grows downwards
    assert motions == set(PHRASES.values())


def test_two_objects_rarely_overlap() -> None:
    ds = MovingShapes(60, 48, 64, 9, seed=9, max_objects=2)
    two, overlapping = 0, 0
    for i in range(len(ds)):
        objs = ds.meta(i)["objects"]
        if len(objs) < 2:
            continue
        two += 1
        t = np.arange(9)
        a, b = objs
        gap = (a["size_px"] + b["size_px"]) / 2
        close = np.ones(9, dtype=bool)
        for ax in range(2):
            ca = a["start"][ax] + t * a["velocity"][ax]
            cb = b["start"][ax] + t * b["velocity"][ax]
            close &= np.abs(ca - cb) < gap
        overlapping += bool(close.any())
    assert two > 15 and overlapping <= two // 10


def test_shapes_and_sizes() -> None:
    def area(shape: str, size: str) -> np.ndarray:
        obj = {"colour": "red", "shape": shape, "size": size, "motion": "still"}
        meta = {"background": "black", "objects": [obj]}
        return _mask(_frames(render(meta, 64, 64, 1)), "red")[0]

    s_small, s_big = 0.15 * 64, 0.30 * 64
    for size, s in (("small", s_small), ("big", s_big)):
        assert area("square", size).sum() == pytest.approx(s * s, rel=0.25)
        assert area("circle", size).sum() == pytest.approx(np.pi * s * s / 4, rel=0.25)
        assert area("triangle", size).sum() == pytest.approx(s * s / 2, rel=0.3)
    assert area("square", "big").sum() / area("square", "small").sum() == pytest.approx(4.0, rel=0.25)
    tri = area("triangle", "big")
    widths = tri.sum(axis=1)[tri.any(axis=1)]
    assert np.all(np.diff(widths) >= 0) and widths[-1] > 3 * widths[0]  # apex up, base down
    sq = area("square", "big")
    rows = sq.sum(axis=1)[sq.any(axis=1)]
    assert np.all(rows == rows[0])


@pytest.mark.parametrize("h,w,f", [(32, 48, 9), (17, 23, 1), (40, 64, 5)])
def test_any_resolution_and_render_roundtrip(h: int, w: int, f: int) -> None:
    ds = MovingShapes(3, h, w, f, seed=11)
    batch = collate([ds[i] for i in range(3)])
    assert batch["video"].shape == (3, 3, f, h, w)
    assert len(batch["caption"]) == 3
    for i in range(3):
        item = ds[i]
        assert torch.equal(render(item["meta"], h, w, f), item["video"])


def test_heldout_prompts() -> None:
    prompts = heldout_prompts(seeds_per_prompt=2)
    assert len(prompts) == 3 * 5 * 3 * 2
    assert len({p["prompt"] for p in prompts}) == 45
    assert {p["seed"] for p in prompts} == {0, 1}
    combos = set()
    for p in prompts:
        (size, colour, shape, motion), = _objects_of(p["prompt"])[0]
        bg = _objects_of(p["prompt"])[1]
        assert (colour, shape) in HELD and size == "big" and RGB[colour] != BG[bg]
        combos.add((colour, shape, motion, bg))
    assert len(combos) == 45
    both = heldout_prompts(seeds_per_prompt=1, sizes=("small", "big"))
    assert len(both) == 90
    # a canonical rendering of every prompt moves the right way
    for p in prompts[::2]:
        (_, colour, _, motion), = _objects_of(p["prompt"])[0]
        mask = _mask(_frames(render(p["meta"], 32, 32, 9)), colour)
        assert mask.any(axis=(1, 2)).all()
        ys, xs = np.mgrid[0:32, 0:32]
        dx = (mask[-1] * xs).sum() / mask[-1].sum() - (mask[0] * xs).sum() / mask[0].sum()
        dy = (mask[-1] * ys).sum() / mask[-1].sum() - (mask[0] * ys).sum() / mask[0].sum()
        expect = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1), "still": (0, 0)}[motion]
        assert (np.sign(round(dx, 6)), np.sign(round(dy, 6))) == expect


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="split"):
        MovingShapes(4, 32, 32, 9, split="test")
    with pytest.raises(ValueError, match="max_objects"):
        MovingShapes(4, 32, 32, 9, max_objects=3)
    with pytest.raises(ValueError, match="height and width"):
        MovingShapes(4, 4, 32, 9)
