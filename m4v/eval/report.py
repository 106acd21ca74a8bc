"""Reports of a VBench-style evaluation (paper Sec. 4.1, Table 1 / Table 4 style): text table, JSON and a
PNG bar chart drawn with Pillow (no matplotlib)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

SOURCE_COLOURS: dict[str, tuple[int, int, int]] = {
    "exact": (46, 139, 87),
    "network": (65, 105, 225),
    "proxy": (230, 145, 56),
}


def source_kind(source: str) -> str:
    """``"exact"``, ``"proxy"`` or ``"network"`` for a metric's source description."""
    if source.startswith("exact"):
        return "exact"
    if source.startswith("proxy"):
        return "proxy"
    return "network"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}%"


def format_report(report: Mapping[str, Any]) -> str:
    """Human-readable summary: per-dimension scores (percent, as VBench reports them) and headline scores."""
    lines = [f"VBench-style evaluation of {report['num_videos']} video(s)"]
    if report.get("videos_dir"):
        lines[0] += f" in {report['videos_dir']}"
    dims: Mapping[str, Mapping[str, Any]] = report["dimensions"]
    width = max([len("dimension")] + [len(d) for d in dims])
    lines += ["", f"{'dimension':<{width}}  {'score':>8}  source"]
    for d, info in dims.items():
        lines.append(f"{d:<{width}}  {_pct(info['value']):>8}  {info['source']}")
    extra = {k: v for k, v in report["metrics"].items() if all(k != i["metric"] for i in dims.values())}
    if extra:
        lines += ["", "other measurements of the same dimensions:"]
        for k, v in extra.items():
            lines.append(f"  {k:<{width}}  {_pct(v['value']):>8}  {v['source']}")
    vb = report["vbench"]
    lines += [""]
    if vb["total_score"] is not None:
        lines.append(f"Total score {_pct(vb['total_score'])} = (4 x Quality {_pct(vb['quality_score'])} "
                     f"+ Semantic {_pct(vb['semantic_score'])}) / 5")
    else:
        nq = 7 - len(vb["missing_quality"])
        lines.append(f"Quality score (partial, {nq}/7 dimensions, VBench-normalised): "
                     f"{_pct(vb['partial_quality_score'])}")
        if vb["partial_semantic_score"] is not None:
            ns = 9 - len(vb["missing_semantic"])
            lines.append(f"Semantic score (partial, {ns}/9 dimensions): {_pct(vb['partial_semantic_score'])}")
        lines.append("Total score: n/a (missing " + ", ".join(vb["missing_quality"] + vb["missing_semantic"]) + ")")
    c1 = report.get("c1")
    if c1 is not None:
        if c1["average"] is not None:
            lines.append(f"C.1 Avg. Score (7 metrics): {_pct(c1['average'])}")
        elif c1["partial_average"] is not None:
            lines.append(f"C.1 Avg. Score (partial, {7 - len(c1['missing'])}/7 metrics): "
                         f"{_pct(c1['partial_average'])}")
    for s in report.get("skipped", []):
        lines.append(f"skipped {s['file']}: {s['reason']}")
    for w in report.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)



def to_json(report: Mapping[str, Any]) -> str:
    """The report as indented JSON."""
    return json.dumps(report, indent=2, default=float)


def write_json(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write :func:`to_json` to ``path`` (parent folders are created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_json(report) + "\n", encoding="utf-8")
    return out


def bar_chart_png(
    labels: Sequence[str],
    values: Sequence[float],
    path: str | os.PathLike[str],
    colours: Sequence[tuple[int, int, int]] | None = None,
    title: str = "",
    vmax: float = 100.0,
    legend: Mapping[str, tuple[int, int, int]] | None = None,
) -> Path:
    """Horizontal bar chart as a PNG: one bar per label, ``value / vmax`` of the plot width, value printed."""
    if len(labels) != len(values) or not labels:
        raise ValueError("bar chart needs the same positive number of labels and values.")
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--plot: {str(out)!r} must end in .png.")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(s: str) -> int:
        box = probe.textbbox((0, 0), s, font=font)
        return int(box[2] - box[0])

    bar_h, gap, pad, plot_w = 18, 8, 12, 420
    label_w = max(text_w(s) for s in labels) + 10
    top = pad + (22 if title else 0)
    legend_h = 20 if legend else 0
    width = pad + label_w + plot_w + 70 + pad
    height = top + len(labels) * (bar_h + gap) + legend_h + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    x0 = pad + label_w
    for i, (label, value) in enumerate(zip(labels, values)):
        y = top + i * (bar_h + gap)
        colour = colours[i] if colours else (70, 130, 180)
        frac = min(max(float(value) / vmax, 0.0), 1.0)
        draw.text((pad, y + 3), label, fill="black", font=font)
        draw.rectangle([x0, y, x0 + plot_w, y + bar_h], outline=(200, 200, 200))
        if frac > 0:
            draw.rectangle([x0, y, x0 + int(round(frac * plot_w)), y + bar_h], fill=colour)
        draw.text((x0 + plot_w + 6, y + 3), f"{float(value):.2f}", fill="black", font=font)
    if legend:
        x, y = x0, top + len(labels) * (bar_h + gap)
        for name, colour in legend.items():
            draw.rectangle([x, y + 3, x + 10, y + 13], fill=colour)
            draw.text((x + 14, y + 2), name, fill="black", font=font)
            x += 24 + text_w(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG")
    return out


def plot_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Bar chart of the per-dimension scores (percent), coloured by exact / network / proxy."""
    dims: Mapping[str, Mapping[str, Any]] = report["dimensions"]
    labels = [d.replace("_", " ") for d in dims]
    values = [100.0 * v["value"] for v in dims.values()]
    colours = [SOURCE_COLOURS[source_kind(v["source"])] for v in dims.values()]
    title = f"VBench-style dimensions, {report['num_videos']} video(s) (%)"
    return bar_chart_png(labels, values, path, colours, title=title, legend=SOURCE_COLOURS)


__all__ = [
    "SOURCE_COLOURS",
    "bar_chart_png",
    "format_report",
    "plot_report",
    "source_kind",
    "to_json",
    "write_json",
]
