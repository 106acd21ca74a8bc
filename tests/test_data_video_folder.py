"""Tests for real text-video loading (m4v.data.video_folder): sources, sampling, resizing, bad data."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from m4v.data.video_folder import (
    VideoTextDataset,
    check_num_frames,
    collate,
    frame_indices,
    mixed_batches,
    mixed_indices,
)

LEVEL0, STEP = 10, 12  # frame t of a "level" video is uniform grey 10 + 12 t


def write_video(
    path: Path, num: int, w: int = 64, h: int = 48, noise: bool = False, faststart: bool = False
) -> None:
    """Lossless H.264 clip; frame t is uniform grey LEVEL0 + STEP * t (or seeded noise)."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "0"}
        for t in range(num):
            if noise:
                rgb = np.random.default_rng(t).integers(0, 256, (h, w, 3), dtype=np.uint8)
            else:
                rgb = np.full((h, w, 3), LEVEL0 + STEP * t, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def stripes(h: int, w: int, axis: int) -> np.ndarray:
    """Red / green / blue bands along ``axis`` (1 = columns) with borders at n // 3 and 2n // 3."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    n = img.shape[axis]
    idx = [slice(None)] * 2
    for c, (a, b) in enumerate([(0, n // 3), (n // 3, 2 * n // 3), (2 * n // 3, n)]):
        idx[axis] = slice(a, b)
        img[tuple(idx)][..., c] = 255
    return img


def check_bands(px: np.ndarray, axis: int, n_src: int, scale: float, offset: int) -> None:
    """``px`` [3, H, W]: bands of ``stripes`` after resizing by ``scale`` and cropping ``offset``.

    Pixels at least 2 px from a band border must be pure red / green / blue (codec/filter tolerance).
    """
    borders = [-np.inf, (n_src // 3) * scale - offset, (2 * n_src // 3) * scale - offset, np.inf]
    centres = np.arange(px.shape[1 + axis]) + 0.5
    for channel in range(3):
        inside = (centres > borders[channel] + 2) & (centres < borders[channel + 1] - 2)
        assert inside.sum() >= 3
        band = np.take(px, np.flatnonzero(inside), axis=1 + axis)
        assert np.all(band[channel] > 200) and np.all(np.delete(band, channel, axis=0) < 55)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    return np.rint((video.numpy().astype(np.float64) + 1) * 127.5)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    write_video(root / "clip.mp4", 20)
    (root / "clip.txt").write_text("a grey clip getting brighter\n", encoding="utf-8")
    Image.fromarray(stripes(48, 64, axis=1)).save(root / "wide.png")
    (root / "wide.txt").write_text("wide stripes", encoding="utf-8")
    (root / "notes.txt").write_text("a caption without media is ignored", encoding="utf-8")
    return root


def test_folder_video_frames_and_image(folder: Path) -> None:
    ds = VideoTextDataset(folder, 32, 32, 9)
    assert len(ds) == 2 and not ds.skipped
    by_kind = {ds[i]["meta"]["kind"]: ds[i] for i in range(2)}
    video, image = by_kind["video"], by_kind["image"]
    assert video["caption"] == "a grey clip getting brighter"
    assert video["video"].shape == (3, 9, 32, 32) and video["video"].dtype == torch.float32
    assert video["video"].min() >= -1 and video["video"].max() <= 1
    expected = np.round(np.linspace(0, 19, 9)).astype(int)  # evenly spaced over the clip
    assert video["meta"]["frame_indices"] == expected.tolist() and video["meta"]["source_frames"] == 20
    means = to_uint8(video["video"]).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(means, LEVEL0 + STEP * expected, atol=2.5)
    # image: one-frame video, shorter side 48 -> 32 (64 -> 43 wide), centre crop of 5 columns
    assert image["video"].shape == (3, 1, 32, 32)
    check_bands(to_uint8(image["video"])[:, 0], axis=1, n_src=64, scale=43 / 64, offset=5)


def test_tall_image_crops_rows_and_non_square_target(tmp_path: Path) -> None:
    Image.fromarray(stripes(96, 48, axis=0)).save(tmp_path / "tall.png")
    (tmp_path / "tall.txt").write_text("tall", encoding="utf-8")
    write_video(tmp_path / "v.mp4", 9)
    (tmp_path / "v.txt").write_text("v", encoding="utf-8")
    ds = VideoTextDataset(tmp_path, 32, 32, 1)
    img = next(ds[i] for i in range(2) if ds[i]["meta"]["kind"] == "image")
    # 48 wide x 96 tall -> 32 x 64, centre crop of 16 rows
    check_bands(to_uint8(img["video"])[:, 0], axis=0, n_src=96, scale=2 / 3, offset=16)
    vid = next(ds[i] for i in range(2) if ds[i]["meta"]["kind"] == "video")
    assert vid["video"].shape == (3, 1, 32, 32) and vid["meta"]["frame_indices"] == [0]
    wide = VideoTextDataset(tmp_path, 24, 40, 9)
    vid = next(wide[i] for i in range(2) if wide[i]["meta"]["kind"] == "video")
    assert vid["video"].shape == (3, 9, 24, 40)
    means = to_uint8(vid["video"]).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(means, LEVEL0 + STEP * np.arange(9), atol=2.5)


def test_csv_and_jsonl_sources(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    write_video(media / "a.mp4", 17)
    Image.fromarray(stripes(40, 40, axis=1)).save(media / "b.jpg")
    (tmp_path / "list.csv").write_text(
        'video,caption,extra\nmedia/a.mp4,"a clip, with comma",1\nmedia/b.jpg,an image,2\n', encoding="utf-8"
    )
    lines = [{"video": "media/a.mp4", "caption": "clip"}, {"video": str(media / "b.jpg"), "caption": "img"}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    for name in ("list.csv", "list.jsonl"):
        ds = VideoTextDataset(tmp_path / name, 16, 16, 17)
        assert len(ds) == 2 and not ds.skipped
        assert ds.video_indices == [0] and ds.image_indices == [1]
        a, b = ds[0], ds[1]
        assert a["video"].shape == (3, 17, 16, 16) and b["video"].shape == (3, 1, 16, 16)
        assert a["meta"]["frame_indices"] == list(range(17))
    assert VideoTextDataset(tmp_path / "list.csv", 16, 16, 1)[0]["caption"] == "a clip, with comma"
    # root overrides the folder relative paths are resolved against
    (tmp_path / "elsewhere.csv").write_text("video,caption\na.mp4,x\n", encoding="utf-8")
    assert VideoTextDataset(tmp_path / "elsewhere.csv", 16, 16, 9, root=media)[0]["video"].shape[1] == 9


def test_wrong_columns_raise_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("path,text\nx.mp4,hello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'video' and 'caption'.*found \['path', 'text'\]"):
        VideoTextDataset(tmp_path / "bad.csv", 16, 16, 9)
    (tmp_path / "bad.jsonl").write_text('{"path": "x.mp4", "text": "hello"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"'video' and 'caption'.*\['path', 'text'\]"):
        VideoTextDataset(tmp_path / "bad.jsonl", 16, 16, 9)
    with pytest.raises(ValueError, match="does not exist"):
        VideoTextDataset(tmp_path / "missing", 16, 16, 9)
    with pytest.raises(ValueError, match="folder, a .csv or a .jsonl"):
        (tmp_path / "x.parquet").write_bytes(b"")
        VideoTextDataset(tmp_path / "x.parquet", 16, 16, 9)


def test_num_frames_validation() -> None:
    for valid in (1, 9, 57, 121, 241):
        check_num_frames(valid)
    with pytest.raises(ValueError, match="nearest valid value is 17"):
        check_num_frames(20)
    with pytest.raises(ValueError, match="nearest valid value is 121"):
        check_num_frames(120)
    with pytest.raises(ValueError, match="nearest valid value is 1"):
        check_num_frames(0)
    with pytest.raises(ValueError, match="num_frames"):
        VideoTextDataset(".", 16, 16, 16)
    # evenly spaced indices against an independent float64 formula
    for total, n in [(20, 9), (121, 57), (9, 9), (100, 1)]:
        ref = [int(np.floor(k * (total - 1) / max(n - 1, 1) + 0.5)) for k in range(n)]
        assert frame_indices(total, n) == ref
    assert frame_indices(100, 5, stride=3) == [43, 46, 49, 52, 55]


def test_bad_data_is_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "bad"
    root.mkdir()

    def caption(stem: str, data: bytes = b"a caption") -> None:
        (root / f"{stem}.txt").write_bytes(data)

    write_video(root / "good.mp4", 12)
    caption("good")
    write_video(root / "good2.mp4", 9)
    caption("good2")
    (root / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    caption("garbage")
    write_video(root / "full.mp4", 20, noise=True)  # index at the end: half a file cannot be opened
    data = (root / "full.mp4").read_bytes()
    (root / "full.mp4").unlink()
    (root / "cut.mp4").write_bytes(data[: len(data) // 2])
    caption("cut")
    write_video(root / "fs.mp4", 20, noise=True, faststart=True)  # index first: decoding stops mid-way
    data = (root / "fs.mp4").read_bytes()
    (root / "fs.mp4").write_bytes(data[: len(data) // 2])
    caption("fs")
    write_video(root / "short.mp4", 5)
    caption("short")
    write_video(root / "nocap.mp4", 9)
    write_video(root / "latin1.mp4", 9)
    caption("latin1", b"caf\xe9 \xff\xfe")
    write_video(root / "empty.mp4", 9)
    caption("empty", b"  \n")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    caption("broken")
    Image.fromarray(stripes(20, 20, axis=1)).save(root / "fine.png")
    caption("fine")

    caplog.set_level(logging.WARNING, logger="m4v.data.video_folder")
    ds = VideoTextDataset(root, 16, 16, 9)
    assert ds.skipped == Counter(missing_caption=2, non_utf8_caption=1)
    assert len(ds) == 8
    assert len(caplog.records) == 3
    assert any("nocap.mp4" in r.getMessage() and "missing_caption" in r.getMessage() for r in caplog.records)

    # lazy: a bad video is replaced by the next valid *video*
    names = [r.path.name for r in ds.records]
    item = ds[names.index("cut.mp4")]
    assert item["meta"]["kind"] == "video" and Path(item["meta"]["path"]).name not in ("cut.mp4", "fs.mp4")
    assert item["video"].shape == (3, 9, 16, 16)
    assert ds.skipped["unreadable"] >= 1
    bad_image = ds[names.index("broken.png")]
    assert bad_image["meta"]["kind"] == "image" and Path(bad_image["meta"]["path"]).name == "fine.png"

    counts = ds.scan()
    assert counts == Counter(
        missing_caption=2, non_utf8_caption=1, unreadable=3, truncated=1, too_few_frames=1
    )
    assert sum(1 for r in caplog.records if r.levelno == logging.WARNING) == 8  # once per bad item
    assert [names[i] for i in ds.video_indices] == ["good.mp4", "good2.mp4"]
    assert [names[i] for i in ds.image_indices] == ["fine.png"]
    for i in range(len(ds)):  # every index yields a valid item, nothing is counted twice
        assert ds[i]["video"].shape[1] in (1, 9)
    assert ds.skipped == counts and len(caplog.records) == 8
    msg = next(r.getMessage() for r in caplog.records if "short.mp4" in r.getMessage())
    assert "too_few_frames" in msg and "5 frames, need 9" in msg and "\n" not in msg
    assert "truncated" in next(r.getMessage() for r in caplog.records if "fs.mp4" in r.getMessage())


def test_bad_rows_in_csv_and_jsonl(tmp_path: Path) -> None:
    write_video(tmp_path / "ok.mp4", 9)
    rows = b"video,caption\nok.mp4,fine\nok.mp4,\nok.mp4,caf\xe9\nmissing.mp4,gone\n,no path\n"
    (tmp_path / "rows.csv").write_bytes(rows)
    ds = VideoTextDataset(tmp_path / "rows.csv", 16, 16, 9)
    assert len(ds) == 2 and ds.skipped == Counter(missing_caption=1, non_utf8_caption=1, bad_record=1)
    ds.scan()
    assert ds.skipped["missing_file"] == 1 and ds.video_indices == [0]
    lines = [
        b'{"video": "ok.mp4", "caption": "fine"}',
        b'{"video": "ok.mp4", "caption": null}',
        b'{"video": "ok.mp4", "caption": "caf\xe9"}',
        b"{not json",
        b'["a", "list"]',
        b'{"caption": "no video"}',
        b'{"video": "ok.mp4", "caption": 3}',
    ]
    (tmp_path / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ds = VideoTextDataset(tmp_path / "rows.jsonl", 16, 16, 9)
    assert len(ds) == 1
    assert ds.skipped == Counter(missing_caption=1, non_utf8_caption=1, bad_record=4)
    assert ds[0]["caption"] == "fine"
    (tmp_path / "none.csv").write_bytes(b"video,caption\nok.mp4,\n")
    with pytest.raises(ValueError, match="no usable item"):
        VideoTextDataset(tmp_path / "none.csv", 16, 16, 9)


def test_mixed_indices_ratio() -> None:
    images, videos = [100, 101, 102], list(range(10))
    draws = mixed_indices(images, videos, 900, ratio=(1, 8), seed=0)
    is_img = np.array([d in images for d in draws])
    assert is_img.sum() == 100
    assert np.all(is_img.reshape(100, 9).sum(axis=1) == 1)  # exactly 1 image in every block of 9
    counts = Counter(draws)
    assert {counts[i] for i in images} <= {33, 34} and {counts[v] for v in videos} <= {80}
    assert draws == mixed_indices(images, videos, 900, ratio=(1, 8), seed=0)
    assert draws != mixed_indices(images, videos, 900, ratio=(1, 8), seed=1)
    assert all(d in videos for d in mixed_indices([], videos, 50))
    assert sum(d in images for d in mixed_indices(images, videos, 500, ratio=(1, 4), seed=3)) == 100
    with pytest.raises(ValueError, match="image_video_ratio"):
        mixed_indices(images, videos, 10, ratio=(0, 0))


def test_mixed_batches_with_dataloader(folder: Path) -> None:
    for k in range(3):
        write_video(folder / f"extra{k}.mp4", 9)
        (folder / f"extra{k}.txt").write_text(f"extra {k}", encoding="utf-8")
    ds = VideoTextDataset(folder, 16, 16, 9)
    batches = ds.mixed_batches(batch_size=2, num_batches=18, seed=0)
    kinds = [all(i in ds.image_indices for i in b) for b in batches]
    assert sum(kinds) == 2  # 1:8 over batches
    assert all(all(i in ds.video_indices for i in b) for b, k in zip(batches, kinds) if not k)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate)
    shapes = Counter(tuple(batch["video"].shape) for batch in loader)
    assert shapes == Counter({(2, 3, 1, 16, 16): 2, (2, 3, 9, 16, 16): 16})
    batch = next(iter(loader))
    assert isinstance(batch["caption"], list) and all(isinstance(c, str) for c in batch["caption"])
    assert len(mixed_batches([0], [1, 2], 3, 9, ratio=(1, 2))) == 9
    with pytest.raises(ValueError, match="different shapes"):
        collate([ds[ds.image_indices[0]], ds[ds.video_indices[0]]])
