"""CPU wall clock of the whole ``m4v generate`` command with the shipped default model (paper Sec. 3.1, E.2).

Each run starts the command in a fresh subprocess (interpreter start, imports, model load, sampling, H.264
encode: what a user waits for) and is timed with the host clock; the median of ``--runs`` (default 3) is the
result. The target of the issue is at most 60 s on a 2-core CPU.

    python benchmarks/bench_cpu_generate.py --out benchmarks/results/cpu_generate.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, write_json  # noqa: E402

PROMPT = "a red circle moving to the right on a black background"
TARGET_S = 60.0


def command(prompt: str, output: str, extra: list[str]) -> list[str]:
    """The installed ``m4v`` script next to this interpreter, else ``python -m m4v``."""
    script = os.path.join(os.path.dirname(sys.executable), "m4v")
    head = [script] if os.path.isfile(script) and os.access(script, os.X_OK) else [sys.executable, "-m", "m4v"]
    return [*head, "generate", prompt, "-o", output, *extra]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def busy_cpu_s() -> float:
    """CPU seconds all processes of the machine have used since boot (/proc/stat; 0 where unavailable)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def time_runs(cmd: list[str], runs: int, env: dict[str, str]) -> list[dict[str, float]]:
    """Per run: wall clock, CPU time of the command (user + sys) and CPU time other processes used meanwhile."""
    import resource

    out = []
    for k in range(runs):
        before, busy0 = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_s()
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        after, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_s()
        if r.returncode != 0:
            raise SystemExit(f"run {k + 1} failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        other = max(0.0, busy1 - busy0 - cpu)
        out.append({"wall_s": wall, "cpu_s": cpu, "other_cpu_s": other})
        print(f"run {k + 1}/{runs}: {wall:.2f} s wall, {cpu:.2f} s CPU; other processes {other:.2f} s CPU", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--out", default="benchmarks/results/cpu_generate.json", help="JSON file ('' for none)")
    p.add_argument("--keep", default=None, help="keep the last video here (default: a temporary folder)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more `m4v generate` flags (default none)")
    args = p.parse_args()
    if args.runs < 1:
        raise SystemExit("--runs: must be at least 1")
    extra = [a for a in args.extra if a != "--"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU even where a GPU exists
    with tempfile.TemporaryDirectory(prefix="m4v-bench-") as tmp:
        video = os.path.join(tmp, "out.mp4")
        cmd = command(args.prompt, video, extra)
        print("command:", " ".join(repr(c) if " " in c else c for c in cmd), flush=True)
        runs = time_runs(cmd, args.runs, env)
        from m4v.io.video import probe_video

        info = probe_video(video)
        if args.keep:
            shutil.copy(video, args.keep)
    times = [r["wall_s"] for r in runs]
    median = statistics.median(times)
    busy = any(r["other_cpu_s"] > 0.1 * r["wall_s"] for r in runs)
    result = {
        "env": {**environment(), "cpu": cpu_model(), "cpu_count": os.cpu_count()},
        "command": ["m4v", "generate", args.prompt, "-o", "out.mp4", *extra],
        "runner": cmd[: cmd.index("generate")],
        "video": {"num_frames": info.num_frames, "height": info.height, "width": info.width, "fps": info.fps},
        "runs": runs,
        "runs_s": times,
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "target_s": TARGET_S,
        "meets_target": median <= TARGET_S,
        "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
        "machine_busy": busy,
    }
    print(f"median {median:.2f} s (min {min(times):.2f}, max {max(times):.2f}) over {len(times)} runs; "
          f"{info.num_frames} frames {info.width}x{info.height}; target <= {TARGET_S:.0f} s: "
          f"{'met' if median <= TARGET_S else 'NOT met'} on {os.cpu_count()} CPU core(s) ({cpu_model()})")
    if busy:
        print("warning: other processes used over 10% of a core during a run; the wall times are inflated")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
