"""benchmarks/ablation_loss_report.py: the paired flow-loss comparison of Table 3 variants, on a hand-computed case."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import load_script

FIELDS = ["step", "kind", "frame", "pyramid_stage", "flow_loss"]


def _script():
    return load_script("benchmarks/ablation_loss_report.py")


def _write(path: Path, rows: list[tuple]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        w.writerows(rows)


def test_paired_relative_difference_by_frame(tmp_path: Path) -> None:
    steps = [(0, "image", 0, 0), (50, "video", 0, 1), (100, "video", 1, 2), (150, "video", 1, 0), (200, "video", 0, 2)]
    control = [0.10, 0.20, 0.10, 0.40, 0.50]
    variant = [0.11, 0.20, 0.12, 0.44, 0.55]  # relative: +10%, 0, +20%, +10%, +10%
    _write(tmp_path / "metrics_full_temp.csv", [(*s, c) for s, c in zip(steps, control)])
    _write(tmp_path / "metrics_no_temporal.csv", [(*s, v) for s, v in zip(steps, variant)])
    out = tmp_path / "loss.json"
    assert _script().main([str(tmp_path), "--from-step", "50", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["variants"]["no_temporal"]
    video = [0.0, 0.2, 0.1, 0.1]
    assert res["video"]["steps"] == 4
    assert res["video"]["mean"] == pytest.approx(sum(video) / 4)
    sd = (sum((x - 0.1) ** 2 for x in video) / 3) ** 0.5
    assert res["video"]["se"] == pytest.approx(sd / 2)
    assert res["video frame 1"]["mean"] == pytest.approx(0.15) and res["video frame 1"]["steps"] == 2
    assert res["image"] == {"steps": 0}  # step 0 is before --from-step


def test_unpaired_runs_and_missing_control_are_refused(tmp_path: Path) -> None:
    _write(tmp_path / "metrics_full_temp.csv", [(0, "video", 0, 0, 0.1), (50, "video", 1, 0, 0.1)])
    _write(tmp_path / "metrics_no_registers.csv", [(0, "video", 0, 0, 0.1), (50, "video", 0, 0, 0.1)])
    with pytest.raises(ValueError, match="same kind of batch"):
        _script().main([str(tmp_path)])
    assert _script().main([str(tmp_path), "--control", "full_attn"]) == 2
