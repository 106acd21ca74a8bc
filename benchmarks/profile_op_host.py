"""Where the host time of the SSD op goes (issue 5 (a)): per-launch costs and a cProfile of eager calls.

At 3968 tokens the SSD forward is launch-bound and at 15488 tokens its kernels add up to about fla's time, so any
host time shows in the measured forward. This prints, on a CUDA machine:
  - calibration: host microseconds of an empty torch op, a small torch kernel and a Triton launch of 1 and of 40
    arguments (launches back to back, one synchronisation at the end);
  - the host time per eager call of the SSD forward (no grad) and forward+backward, with the kernels launched
    through m4v.ops.triton_host.CachedLaunch and through JITFunction.run at every call, and a cProfile of each
    (functions by their own time);
  - the GPU time of each kernel of the forward at --kernel-tokens (torch.profiler), against fla's forward.
    PYTHONPATH=. python benchmarks/profile_op_host.py --out benchmarks/results/op_host_h100.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, write_json  # noqa: E402


def per_call_us(fn: Callable[[], object], calls: int = 300, rep: int = 5) -> float:
    """Median over ``rep`` of wall microseconds per call of ``calls`` back-to-back calls, one sync at the end."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def launch_only_us(fn: Callable[[], object], calls: int = 300) -> float:
    """Microseconds per call until the Python call returns (no synchronisation inside the timed loop)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return t


def calibration() -> dict[str, float]:
    import triton
    import triton.language as tl

    @triton.jit
    def one_arg(x_ptr):
        tl.store(x_ptr, 1.0)

    @triton.jit
    def many_args(x_ptr, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19,
                  a20, a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31, a32, a33, a34, a35,
                  C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr):  # fmt: skip
        tl.store(x_ptr, (a1 + a35 + C1 + C4).to(tl.float32))

    x = torch.zeros(16, device="cuda")
    y = torch.zeros(16, device="cuda")
    ints = list(range(1, 36))
    out = {
        "torch_empty_us": launch_only_us(lambda: torch.empty(16, device="cuda")),
        "torch_noop_contiguous_us": launch_only_us(lambda: x.contiguous()),
        "torch_add_us": launch_only_us(lambda: torch.add(x, y)),
        "triton_1arg_us": launch_only_us(lambda: one_arg[(1,)](x)),
        "triton_40arg_us": launch_only_us(lambda: many_args[(1,)](x, *ints, C1=1, C2=2, C3=3, C4=4)),
        "triton_40arg_nw_us": launch_only_us(
            lambda: many_args[(1,)](x, *ints, C1=1, C2=2, C3=3, C4=4, num_warps=4, num_stages=2)
        ),
    }
    compiled = many_args[(1,)](x, *ints, C1=1, C2=2, C3=3, C4=4)
    if compiled is not None and hasattr(compiled, "__getitem__"):
        try:
            runner = compiled[(1, 1, 1)]
            out["triton_40arg_compiled_runner_us"] = launch_only_us(lambda: runner(x, *ints, 1, 2, 3, 4))
        except Exception as e:  # noqa: BLE001 - internal API: record why
            out["triton_40arg_compiled_runner_error"] = f"{type(e).__name__}: {str(e)[:200]}"  # type: ignore[assignment]
    return out


def ssd_inputs(l: int, grad: bool, h: int = 30, p: int = 64, n: int = 64) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype).requires_grad_(grad)

    return {"x": rnd(1, l, h, p), "dt": rnd(1, l, h, scale=0.5), "A": (-torch.rand(h, device="cuda") - 0.5)
            .requires_grad_(grad), "B": rnd(1, l, h, n), "C": rnd(1, l, h, n), "D": rnd(h, dtype=torch.float32),
            "dt_bias": rnd(h, scale=0.1, dtype=torch.float32)}  # fmt: skip


def cprofile_text(fn: Callable[[], object], calls: int, top: int) -> str:
    fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def kernel_times(fn: Callable[[], object], reps: int = 20) -> list[tuple[str, float]]:
    """(kernel name, GPU microseconds per call) of every CUDA kernel fn() launches."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dev = getattr(ev, "self_device_time_total", None)
        if dev is None:
            dev = getattr(ev, "self_cuda_time_total", 0.0)
        if dev > 0:
            rows.append((ev.key[:80], dev / reps))
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 3968])
    ap.add_argument("--kernel-tokens", type=int, default=15488)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_op_host.py needs a CUDA device.")
    from m4v.ops.ssd_triton import ssd_triton

    result: dict = {**environment(), "benchmark": "op_host", "calibration": calibration(), "ssd": []}
    print(result["calibration"], flush=True)
    for l in args.tokens:
        plain = ssd_inputs(l, grad=False)
        leaves = ssd_inputs(l, grad=True)
        gy = torch.randn(1, l, 30, 64, device="cuda", dtype=torch.bfloat16)

        def fwd(v: dict[str, torch.Tensor] = plain) -> torch.Tensor:
            return ssd_triton(v["x"], v["dt"], v["A"], v["B"], v["C"], D=v["D"], dt_bias=v["dt_bias"],
                              dt_softplus=True, chunk_size=256)  # fmt: skip

        def fwd_bwd() -> None:
            fwd(leaves).backward(gy)
            for t in leaves.values():
                t.grad = None

        from m4v.ops import triton_host

        triton_host.FAST_LAUNCH["enabled"] = False  # every launch through JITFunction.run, as before CachedLaunch
        plain = {"fwd_wall_plain_launch_us": per_call_us(fwd), "fwdbwd_wall_plain_launch_us": per_call_us(fwd_bwd)}
        triton_host.FAST_LAUNCH["enabled"] = True  # the cached launches (off by default for now)
        row = {"tokens": l, **plain, "fwd_wall_us": per_call_us(fwd), "fwd_launch_us": launch_only_us(fwd),
               "fwdbwd_wall_us": per_call_us(fwd_bwd), "fwdbwd_launch_us": launch_only_us(fwd_bwd),
               "fwd_cprofile": cprofile_text(fwd, args.calls, args.top),
               "fwdbwd_cprofile": cprofile_text(fwd_bwd, args.calls, args.top)}  # fmt: skip
        print({k: v for k, v in row.items() if not k.endswith("cprofile")}, flush=True)
        print(row["fwdbwd_cprofile"], flush=True)
        result["ssd"].append(row)
    l = args.kernel_tokens
    plain = ssd_inputs(l, grad=False)
    kt = {"tokens": l, "ours": kernel_times(lambda: ssd_triton(
        plain["x"], plain["dt"], plain["A"], plain["B"], plain["C"], D=plain["D"], dt_bias=plain["dt_bias"],
        dt_softplus=True, chunk_size=256))}  # fmt: skip
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        d = torch.nn.functional.softplus(plain["dt"].float() + plain["dt_bias"])
        v = (plain["x"].float() * d[..., None]).bfloat16()
        gate = (d * plain["A"]).contiguous()
        kt["fla"] = kernel_times(lambda: chunk_simple_gla(plain["C"], plain["B"], v, g=gate, scale=1.0))
    except ImportError as e:
        kt["fla"] = f"not importable: {e}"
    result["kernels_us"] = kt
    for name in ("ours", "fla"):
        rows = kt[name]
        if isinstance(rows, list):
            print(f"{name} forward kernels at {l} tokens (us per call): total {sum(r[1] for r in rows):.1f}")
            for k, us in rows:
                print(f"  {us:8.1f}  {k}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
