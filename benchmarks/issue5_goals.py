"""Issue 5's three speed goals read from one run's JSON files: met or missed, and by how much (docs/performance.md).

    python benchmarks/issue5_goals.py --ssd OUT/ssd.json --layers OUT/layers.json --generate OUT/generate.json \\
        --out OUT/goals.json

(a) SSD op (``bench_ssd.py``): forward no slower than fla's ``chunk_simple_gla`` and forward+backward no slower than
    mamba_ssm's ``mamba_chunk_scan_combined``, for every shape and length of the file;
(b) mixer layers (``bench_layers.py``): fwd+bwd of MM-DiM with the temporal branch at least 2x faster than the
    attention layer at 15488 tokens and no slower at 3968, for each execution mode present in the file (eager,
    ``compiled:MODE``, ``cuda-graph``), each against attention in the same mode;
(c) end to end (``bench_generate.py``): full_temp at least 1.6x faster than full_attn at 241 frames, for each
    setting (attention backend, CUDA graphs) that has both layouts.
A speed-up is the other's time over ours; a goal is met when it reaches the target. Any file may be left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, write_json  # noqa: E402

ATTENTION, MMDIM = "attention/cudnn", "mmdim+temporal/triton"


def _row(speedup: float, target: float, **where: Any) -> dict[str, Any]:
    return {**where, "speedup": speedup, "target": target, "met": speedup >= target}


def ssd_goals(data: dict[str, Any]) -> list[dict[str, Any]]:
    """(a): fla fwd / ours fwd >= 1 and mamba_ssm fwd+bwd / ours fwd+bwd >= 1 for every result row."""
    out = []
    for r in data["results"]:
        ms, where = r["ms"], {"tokens": r["l"], "heads": r["h"], "groups": r["g"], "d_state": r["n"]}
        if "triton_fwd" in ms and "fla_fwd" in ms:
            out.append(_row(ms["fla_fwd"] / ms["triton_fwd"], 1.0, goal="a: fwd vs fla", **where))
        if "triton_fwdbwd" in ms and "mamba_fwdbwd" in ms:
            out.append(_row(ms["mamba_fwdbwd"] / ms["triton_fwdbwd"], 1.0, goal="a: fwd+bwd vs mamba_ssm", **where))
    return out


def layer_goals(data: dict[str, Any]) -> list[dict[str, Any]]:
    """(b): attention fwd+bwd / MM-DiM+temporal fwd+bwd, per execution mode, >= 2 at 15488 tokens, >= 1 at 3968."""
    times = {(r["layer"], r["tokens"]): r["fwd_bwd_ms"] for r in data["rows"] if "fwd_bwd_ms" in r}
    out = []
    for (layer, tokens), ms in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if not layer.startswith(MMDIM) or tokens not in (3968, 15488):
            continue
        mode = layer[len(MMDIM):].strip() or "eager"
        other = times.get((ATTENTION + ("" if mode == "eager" else " " + mode), tokens))
        if other is not None:
            out.append(_row(other / ms, 2.0 if tokens == 15488 else 1.0, goal="b: layer fwd+bwd", tokens=tokens,
                            mode=mode))
    return out


def generate_goals(data: dict[str, Any], frames: int = 241) -> list[dict[str, Any]]:
    """(c): full_attn / full_temp transformer seconds at ``frames``, per (attention, CUDA graphs) setting."""
    seconds = {(r["layout"], r.get("attention", "sdpa"), bool(r.get("cuda_graphs"))): r["transformer_s"]
               for r in data["rows"] if r.get("frames") == frames and "transformer_s" in r}
    out = []
    for (layout, attention, graphs), ours in sorted(seconds.items()):
        other = seconds.get(("full_attn", attention, graphs))
        if layout == "full_temp" and other is not None:
            out.append(_row(other / ours, 1.6, goal=f"c: end to end, {frames} frames", attention=attention,
                            cuda_graphs=graphs))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ssd", help="bench_ssd.py JSON")
    p.add_argument("--layers", help="bench_layers.py JSON")
    p.add_argument("--generate", help="bench_generate.py JSON")
    p.add_argument("--out", help="JSON output")
    args = p.parse_args(argv)
    rows, sources = [], {}
    for name, path, read in (("ssd", args.ssd, ssd_goals), ("layers", args.layers, layer_goals),
                             ("generate", args.generate, generate_goals)):
        if not path:
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: --{name}: {e}", file=sys.stderr)
            return 2
        rows += read(data)
        sources[name] = {"file": path, "device": data.get("device"), "commit": data.get("commit"),
                         "date": data.get("date"), "command": data.get("command")}
    if not rows:
        print("error: give at least one of --ssd, --layers, --generate (with goal rows in it)", file=sys.stderr)
        return 2
    print("| goal | where | speed-up | target | met |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        where = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("goal", "speedup", "target", "met"))
        print(f"| {r['goal']} | {where} | {r['speedup']:.2f}x | {r['target']:g}x | {'yes' if r['met'] else 'NO'} |")
    write_json(args.out, {**environment(), "benchmark": "issue 5 goals", "sources": sources, "goals": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
