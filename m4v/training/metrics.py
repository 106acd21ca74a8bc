"""Training logs: a CSV file, optional TensorBoard, running per-stage losses for the progress bar."""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class RunningMean:
    """Exponential running mean per key (for the progress bar)."""

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = beta
        self.values: dict[Any, float] = {}

    def update(self, key: Any, value: float) -> float:
        old = self.values.get(key)
        self.values[key] = value if old is None else self.beta * old + (1 - self.beta) * value
        return self.values[key]


class MetricsWriter:
    """Append rows to ``metrics.csv`` (header from the first row) and mirror scalars to TensorBoard."""

    def __init__(self, folder: str | Path, tensorboard: bool = True, name: str = "metrics.csv") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / name
        self._fields: list[str] | None = None
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                self._fields = next(csv.reader(f), None)
        self.tb = None
        self.note = ""
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.folder / "tensorboard"))
            except ImportError:
                self.note = "tensorboard is not installed (pip install tensorboard); logging to CSV only"
                logger.warning(self.note)
        self._buffer: dict[str, list[float]] = defaultdict(list)

    def truncate_from(self, step: int) -> None:
        """Drop rows with ``step >= step`` (logged after the checkpoint a run resumes from)."""
        if self._fields is None or "step" not in self._fields:
            return
        rows = read_metrics(self.path)
        keep = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) < step]
        if len(keep) == len(rows):
            return
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields)
            w.writeheader()
            w.writerows(keep)

    def write(self, row: dict[str, Any]) -> None:
        if self._fields is None:
            self._fields = list(row)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self._fields)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k, "")) for k in self._fields])
        if self.tb is not None:
            step = int(row.get("step", 0))
            for k, v in row.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.8g}"
    return v


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """Rows of a metrics CSV as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
