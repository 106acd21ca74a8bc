"""benchmarks/issue5_goals.py: issue 5's goals read from benchmark JSON, on hand-computed cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script


def _goals():
    return load_script("benchmarks/issue5_goals.py")


def test_each_goal_against_its_target(tmp_path: Path) -> None:
    ssd = {"results": [{"l": 3968, "h": 30, "g": 30, "p": 64, "n": 64,
                        "ms": {"triton_fwd": 0.2, "fla_fwd": 0.25, "triton_fwdbwd": 2.0, "mamba_fwdbwd": 1.5}}]}
    layers = {"rows": [
        {"layer": "attention/cudnn", "tokens": 15488, "fwd_bwd_ms": 20.0},
        {"layer": "mmdim+temporal/triton", "tokens": 15488, "fwd_bwd_ms": 12.5},
        {"layer": "attention/cudnn cuda-graph", "tokens": 3968, "fwd_bwd_ms": 2.5},
        {"layer": "mmdim+temporal/triton cuda-graph", "tokens": 3968, "fwd_bwd_ms": 2.0},
        {"layer": "mmdim+temporal/triton compiled:default", "tokens": 3968, "fwd_bwd_ms": 1.0},  # no attention row
        {"layer": "mmdim/triton", "tokens": 15488, "fwd_bwd_ms": 1.0},  # without the temporal branch: not a goal
        {"layer": "mmdim plan build (host)", "tokens": 15488, "fwd_ms": 3.0},
    ]}
    gen = {"rows": [{"layout": "full_temp", "frames": 241, "cuda_graphs": True, "transformer_s": 100.0},
                    {"layout": "full_attn", "frames": 241, "cuda_graphs": True, "transformer_s": 170.0},
                    {"layout": "full_attn", "frames": 121, "cuda_graphs": True, "transformer_s": 1.0}]}
    paths = {}
    for name, data in (("ssd", ssd), ("layers", layers), ("generate", gen)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    out = tmp_path / "goals.json"
    assert _goals().main([f"--{k}={v}" for k, v in paths.items()] + ["--out", str(out)]) == 0
    rows = {(r["goal"], r.get("tokens"), r.get("mode")): r for r in json.loads(out.read_text())["goals"]}
    assert len(rows) == 5
    fla = rows[("a: fwd vs fla", 3968, None)]
    assert fla["speedup"] == pytest.approx(1.25) and fla["met"]
    mamba = rows[("a: fwd+bwd vs mamba_ssm", 3968, None)]
    assert mamba["speedup"] == pytest.approx(0.75) and not mamba["met"]
    eager = rows[("b: layer fwd+bwd", 15488, "eager")]
    assert eager["speedup"] == pytest.approx(1.6) and eager["target"] == 2.0 and not eager["met"]
    graph = rows[("b: layer fwd+bwd", 3968, "cuda-graph")]
    assert graph["speedup"] == pytest.approx(1.25) and graph["target"] == 1.0 and graph["met"]
    e2e = rows[("c: end to end, 241 frames", None, None)]
    assert e2e["speedup"] == pytest.approx(1.7) and e2e["met"] and e2e["cuda_graphs"] is True


def test_no_input_is_an_error(tmp_path: Path) -> None:
    assert _goals().main([]) == 2
    assert _goals().main(["--ssd", str(tmp_path / "missing.json")]) == 2
