"""Issue "GPU speed": torch vs fused Triton for the Mamba2 layer's causal conv and gated RMSNorm (M4V Sec. 3.1).

Shapes are those of the MM-DiM mixer of bench_layers.py at width 1920 (expand 1, 30 heads x 64, d_state 64,
30 groups): the conv runs over xBC, 5760 channels, read as a slice of the 7710-wide in_proj output; the gated
norm over 1920 channels in groups of 64, z a slice of the same buffer. bf16, forward and forward+backward, at
3968 / 15488 / 65536 tokens. Implementations: "torch" (the eager torch path), "compile" (the same under
torch.compile, the strongest torch baseline), "triton" (m4v.ops.conv_triton / m4v.ops.norm_triton).
GB/s counts the minimal DRAM traffic (each tensor read or written once). --sweep also times alternative
Triton launch configurations and records the fastest per shape.

    PYTHONPATH=. python benchmarks/bench_layer_ops.py --out benchmarks/results/layer_ops.json
    PYTHONPATH=. python benchmarks/bench_layer_ops.py --sweep --out benchmarks/results/layer_ops_sweep.json
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/bench_layer_ops.py --device cpu --tokens 64 --dtype float32
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import bench, environment, peak_memory, write_json  # noqa: E402

from m4v.ops.conv import _causal_conv1d_torch  # noqa: E402
from m4v.ops.norm import gated_rms_norm_torch  # noqa: E402

CONV_SWEEP = {  # (BLOCK_S, BLOCK_D, num_warps, programs_per_sm)
    "fwd": [(4, 128, 4, 16), (2, 128, 2, 16), (8, 128, 8, 16), (4, 256, 8, 16), (4, 64, 2, 16), (4, 128, 4, 64)],
    "bwd": [(4, 128, 4, 16), (2, 128, 2, 16), (8, 128, 8, 16), (4, 256, 8, 16), (4, 64, 2, 16), (4, 128, 4, 64)],
}
NORM_SWEEP = {  # (elements per tile, elements per warp)
    "fwd": [(4096, 512), (2048, 256), (8192, 512), (4096, 256), (2048, 512)],
    "bwd": [(2048, 256), (1024, 128), (4096, 256), (2048, 512), (4096, 512)],
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def time_fwd_bwd(
    fn: Callable[..., torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor, warmup: int, rep: int
) -> tuple[float, float, float]:
    """(forward ms, forward+backward ms, forward+backward peak GiB above the inputs)."""

    def fwd() -> None:
        with torch.no_grad():
            fn(*leaves)

    def fwd_bwd() -> None:
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)

    return bench(fwd, warmup, rep), bench(fwd_bwd, warmup, rep), peak_memory(fwd_bwd)


def conv_case(n: int, dev: torch.device, dt: torch.dtype, d: int, width: int, offset: int) -> dict:
    g = torch.Generator(device=dev).manual_seed(n)
    buf = torch.randn(1, n, width, device=dev, dtype=dt, generator=g)
    x = buf[:, :, offset : offset + d].detach().requires_grad_(True)  # strided leaf, like the in_proj slice
    w = (0.5 * torch.randn(d, 4, device=dev, generator=g)).to(dt).requires_grad_(True)
    b = (0.5 * torch.randn(d, device=dev, generator=g)).to(dt).requires_grad_(True)
    grad = torch.randn(1, n, d, device=dev, dtype=dt, generator=g)
    bytes_fwd = 2 * n * d * x.element_size()
    return {"leaves": [x, w, b], "grad": grad, "bytes": (bytes_fwd, bytes_fwd + 3 * n * d * x.element_size())}


def norm_case(n: int, dev: torch.device, dt: torch.dtype, d: int, width: int) -> dict:
    g = torch.Generator(device=dev).manual_seed(n + 1)
    y = torch.randn(1, n, d, device=dev, dtype=dt, generator=g).requires_grad_(True)
    buf = torch.randn(1, n, width, device=dev, dtype=dt, generator=g)
    z = buf[:, :, :d].detach().requires_grad_(True)
    w = (1 + 0.5 * torch.randn(d, device=dev, generator=g)).to(dt).requires_grad_(True)
    grad = torch.randn(1, n, d, device=dev, dtype=dt, generator=g)
    e = y.element_size()
    return {"leaves": [y, z, w], "grad": grad, "bytes": (3 * n * d * e, 8 * n * d * e)}


def implementations(op: str, group: int, use_compile: bool) -> dict[str, Callable[..., torch.Tensor]]:
    if op == "conv":

        def eager(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return _causal_conv1d_torch(x, w, b, "silu", None)

    else:

        def eager(y: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return gated_rms_norm_torch(y, z, w, group, 1e-5)

    impls: dict[str, Callable[..., torch.Tensor]] = {"torch": eager}
    if use_compile:
        impls["compile"] = torch.compile(eager, dynamic=False)
    try:
        if op == "conv":
            from m4v.ops.conv_triton import causal_conv1d_triton

            impls["triton"] = lambda x, w, b: causal_conv1d_triton(x, w, b, "silu")
        else:
            from m4v.ops.norm_triton import gated_rms_norm

            impls["triton"] = lambda y, z, w: gated_rms_norm(y, z, w, group, 1e-5)
    except ImportError as e:
        print(f"triton unavailable: {e}")
    return impls


def sweep(op: str, case: dict, fn: Callable[..., torch.Tensor], warmup: int, rep: int) -> dict:
    """Time each launch configuration of the Triton kernels (forward alone; backward inside forward+backward)."""
    if op == "conv":
        from m4v.ops import conv_triton as mod

        keys, grid = ("BLOCK_S", "BLOCK_D", "num_warps", "programs_per_sm"), CONV_SWEEP
    else:
        from m4v.ops import norm_triton as mod

        keys, grid = ("elements", "elements_per_warp"), NORM_SWEEP
    out: dict[str, list] = {"fwd": [], "bwd": []}
    saved = {"fwd": dict(mod.FWD_CONFIG), "bwd": dict(mod.BWD_CONFIG)}
    try:
        for phase, table in (("fwd", mod.FWD_CONFIG), ("bwd", mod.BWD_CONFIG)):
            for values in grid[phase]:
                table.update(zip(keys, values))
                try:
                    f, fb, _ = time_fwd_bwd(fn, case["leaves"], case["grad"], warmup, rep)
                    out[phase].append({"config": dict(zip(keys, values)), "fwd_ms": f, "fwd_bwd_ms": fb})
                except Exception as e:  # noqa: BLE001 - a config the compiler rejects is recorded, not fatal
                    out[phase].append({"config": dict(zip(keys, values)), "error": repr(e)[:200]})
                table.clear()
                table.update(saved[phase])
    finally:
        for phase, table in (("fwd", mod.FWD_CONFIG), ("bwd", mod.BWD_CONFIG)):
            table.clear()
            table.update(saved[phase])
    for phase, metric in (("fwd", "fwd_ms"), ("bwd", "fwd_bwd_ms")):
        ok = [r for r in out[phase] if metric in r]
        if ok:
            out[f"best_{phase}"] = min(ok, key=lambda r: r[metric])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[3968, 15488, 65536])
    ap.add_argument("--conv-dim", type=int, default=5760, help="xBC channels (d_inner + 2 * ngroups * d_state)")
    ap.add_argument("--dim", type=int, default=1920, help="d_inner, the gated norm's channels")
    ap.add_argument("--group", type=int, default=64, help="gated norm group size (d_inner / ngroups)")
    ap.add_argument("--width", type=int, default=7710, help="in_proj output width (z | xBC | dt)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ops", nargs="+", default=["conv", "norm"], choices=["conv", "norm"])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--sweep", action="store_true", help="also time alternative Triton launch configurations")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rep", type=int, default=20)
    args = ap.parse_args()
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    use_compile = not args.no_compile and dev.type == "cuda"
    rows, sweeps = [], []
    for op in args.ops:
        impls = implementations(op, args.group, use_compile)
        for n in args.tokens:
            if op == "conv":
                case = conv_case(n, dev, dt, args.conv_dim, args.width, args.dim)
            else:
                case = norm_case(n, dev, dt, args.dim, args.width)
            with torch.no_grad():
                ref = impls["torch"](*case["leaves"]).float()
            base = None
            for name, fn in impls.items():
                row = {"op": op, "impl": name, "tokens": n}
                try:
                    with torch.no_grad():
                        row["rel_err_vs_torch"] = rel_err(fn(*case["leaves"]), ref)
                    f, fb, mem = time_fwd_bwd(fn, case["leaves"], case["grad"], args.warmup, args.rep)
                except Exception as e:  # noqa: BLE001 - record and go on (e.g. torch.compile unavailable)
                    row["error"] = repr(e)[:300]
                    rows.append(row)
                    print(row)
                    continue
                row.update(fwd_ms=f, fwd_bwd_ms=fb, fwd_bwd_peak_gib=mem)
                row["fwd_gbps"] = case["bytes"][0] / f / 1e6
                row["fwd_bwd_gbps"] = case["bytes"][1] / fb / 1e6
                if name == "torch":
                    base = row
                elif base is not None:
                    row["speedup_fwd"] = base["fwd_ms"] / f
                    row["speedup_fwd_bwd"] = base["fwd_bwd_ms"] / fb
                rows.append(row)
                print(row)
            if args.sweep and "triton" in impls:
                sweeps.append({"op": op, "tokens": n, **sweep(op, case, impls["triton"], args.warmup, args.rep)})
                print(sweeps[-1].get("best_fwd"), sweeps[-1].get("best_bwd"))
            del case
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    shapes = {"conv_dim": args.conv_dim, "dim": args.dim, "group": args.group, "width": args.width}
    write_json(args.out, {"env": environment(), "dtype": args.dtype, "shapes": shapes, "rows": rows, "sweeps": sweeps})
    print(f"\n{'op':5s} {'impl':8s} {'tokens':>7s} {'fwd ms':>8s} {'f+b ms':>8s} {'fwd GB/s':>9s} {'f+b GB/s':>9s} "
          f"{'x fwd':>6s} {'x f+b':>6s} {'rel err':>8s}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['op']:5s} {r['impl']:8s} {r['tokens']:7d}  error: {r['error'][:60]}")
            continue
        print(
            f"{r['op']:5s} {r['impl']:8s} {r['tokens']:7d} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} "
            f"{r['fwd_gbps']:9.0f} {r['fwd_bwd_gbps']:9.0f} {r.get('speedup_fwd', 1.0):6.2f} "
            f"{r.get('speedup_fwd_bwd', 1.0):6.2f} {r['rel_err_vs_torch']:8.1e}"
        )
    for s in sweeps:
        for phase in ("fwd", "bwd"):
            best = s.get(f"best_{phase}")
            if best:
                print(f"sweep {s['op']} {s['tokens']} best {phase}: {best}")


if __name__ == "__main__":
    main()
