"""Issue 5 (b): the MM-DiM mixer layer vs the attention mixer layer at width 1920, forward and forward+backward.

Attention mixer layer: qkv projection, RMSNorm q/k, 3D RoPE, SDPA (cuDNN backend, no mask: the fastest
attention the GPU offers), out projection.  MM-DiM mixer layer: MM-token re-composition (text twice,
registers, zigzag), Mamba2 (in_proj, causal conv, SSD, gated norm), inverse, temporal branch, out_proj.
Token counts are those of the paper's sequences: 3968 = first frame + text, 11888 = last step at 121
frames, 15488 = last step at 241 frames, 65536 = a long sequence.

    PYTHONPATH=. python benchmarks/bench_layers.py --out benchmarks/results/layers.json
    PYTHONPATH=. python benchmarks/bench_layers.py --tokens 3968 15488 --compile default reduce-overhead

The MM-DiM layer reads its re-composition plan (gather indices of the scan path, text placement, registers)
from a SequenceContext built once per forward pass and shared by every block; here it is built once per
sequence, like the attention layer's RoPE tables, and its build time is reported as its own row
("plan build", host time, once per forward and scan path). ``--compile MODE ...`` adds rows for
``torch.compile(layer, mode=MODE)`` of the attention layer and the MM-DiM layers (Triton SSD), at the token
counts of ``--compile-tokens``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import bench, environment, peak_memory, write_json  # noqa: E402

from m4v.layers.attention import QKNorm  # noqa: E402
from m4v.layers.rope import frame_positions, rope_cos_sin  # noqa: E402
from m4v.models.blocks import MMDiMBlock, SequenceContext  # noqa: E402

# (label, text tokens, frame token grids): the sequences of the paper at 768p
LAYOUTS = {
    3968: (128, [(48, 80)]),
    11888: (128, [(12, 20)] * 13 + [(24, 40), (48, 80), (48, 80)]),
    15488: (128, [(12, 20)] * 28 + [(24, 40), (48, 80), (48, 80)]),
    65536: (256, [(24, 40)] * 4 + [(48, 80)] * 16),
}


class AttentionMixer(nn.Module):
    """qkv -> RMSNorm q/k -> RoPE -> SDPA -> out."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qk = QKNorm(heads, dim // heads)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], backend) -> torch.Tensor:  # noqa: ANN001
        q, k, v = self.qk(self.qkv(x), rope)  # fused q/k RMSNorm + RoPE, as in the model's attention blocks
        with torch.nn.attention.sdpa_kernel(backend):
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


def measure(layer: str, tokens: int, fwd, grad: torch.Tensor) -> dict:  # noqa: ANN001
    """fwd ms, fwd+bwd ms and peak GiB of one layer function, or the first line of its error."""
    try:
        fb = lambda: fwd().backward(grad)  # noqa: E731
        return dict(layer=layer, tokens=tokens, fwd_ms=bench(fwd), fwd_bwd_ms=bench(fb),
                    peak_gib_fwd_bwd=peak_memory(fb))
    except RuntimeError as e:
        return dict(layer=layer, tokens=tokens, error=str(e).splitlines()[0])


class _Call(nn.Module):
    """A layer function of x as a module (make_graphed_callables takes modules or functions of their tensor args)."""

    def __init__(self, fn, modules: list[nn.Module]) -> None:  # noqa: ANN001
        super().__init__()
        self.fn, self.held = fn, nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG002 - fn closes over this same x
        return self.fn()


def graphed_row(name: str, fn, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, tokens: int) -> dict:  # noqa: ANN001
    """fwd and fwd+bwd ms of the eager layer function replayed as two CUDA graphs (forward; backward to x and to
    every parameter of ``module``; its parameters outside the layer, e.g. the block's MLP, get no gradient)."""
    try:
        graphed = torch.cuda.make_graphed_callables(_Call(fn, [module]), (x,), allow_unused_input=True)
        return measure(f"{name} cuda-graph", tokens, lambda: graphed(x), grad)
    except Exception as e:  # noqa: BLE001 - report a capture failure as a row
        return dict(layer=f"{name} cuda-graph", tokens=tokens, error=str(e).splitlines()[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=list(LAYOUTS))
    ap.add_argument("--dim", type=int, default=1920)
    ap.add_argument("--heads", type=int, default=30)
    ap.add_argument("--ssd-backends", nargs="+", default=["triton", "torch"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", nargs="*", default=[], metavar="MODE",
                    help="torch.compile modes to time as well (default, reduce-overhead, max-autotune-no-cudagraphs)")
    ap.add_argument("--compile-tokens", type=int, nargs="+", default=[3968, 15488])
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also time each eager layer captured whole, fwd and bwd, by torch.cuda.make_graphed_callables")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    from torch.nn.attention import SDPBackend

    from m4v.ops import list_ssd_backends

    D, H = args.dim, args.heads
    rows = []
    attn = AttentionMixer(D, H).to(dev, dt)
    ssm = dict(d_state=D // H, expand=1, headdim=D // H, ngroups=H, chunk_size=256)
    mixers = {
        "mmdim+temporal": MMDiMBlock(D, H, 4 * D, ssm, path=1, temporal_branch=True).to(dev, dt),
        "mmdim": MMDiMBlock(D, H, 4 * D, ssm, path=1, temporal_branch=False).to(dev, dt),
    }
    for n in args.tokens:
        L, sizes = LAYOUTS[n]
        nv = sum(a * b for a, b in sizes)
        x = torch.randn(1, L + nv, D, device=dev, dtype=dt, requires_grad=True)
        grad = torch.randn_like(x)
        pos = frame_positions(sizes, sizes[-1], L, dev)
        axes = (16, 24, 24) if D // H == 64 else (D // H // 4 * 2, D // H // 4, D // H // 4)
        rope = rope_cos_sin(pos, axes)
        backends = (("attention/cudnn", SDPBackend.CUDNN_ATTENTION), ("attention/flash", SDPBackend.FLASH_ATTENTION))
        for name, backend in backends if dev.type == "cuda" else (("attention/math", SDPBackend.MATH),):
            try:
                f = lambda: attn(x, rope, backend)  # noqa: E731
                fb = lambda: attn(x, rope, backend).backward(grad)  # noqa: E731
                rows.append(dict(layer=name, tokens=L + nv, fwd_ms=bench(f), fwd_bwd_ms=bench(fb),
                                 peak_gib_fwd_bwd=peak_memory(fb)))
            except RuntimeError as e:
                rows.append(dict(layer=name, tokens=L + nv, error=str(e).splitlines()[0]))
        mask = torch.ones(1, L, dtype=torch.bool, device=dev)
        builds = []  # a fresh context each time; the first build also pays one-off lazy initialisation
        for _ in range(4):
            ctx = SequenceContext(mask, sizes, axes, 10000.0)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ctx.prepare({1}, attention=False)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            builds.append(1e3 * (time.perf_counter() - t0))
        rows.append(dict(layer="mmdim plan build (host)", tokens=L + nv, fwd_ms=sorted(builds[1:])[1],
                         first_build_ms=builds[0]))
        timed = {}  # name -> (forward function, SSD backend or None), also used by --compile
        for ssd_backend in args.ssd_backends:
            if ssd_backend not in list_ssd_backends():
                continue
            os.environ["M4V_SSD_BACKEND"] = ssd_backend
            for name, block in mixers.items():
                def fwd(block=block):  # noqa: ANN001, ANN202
                    return block.mix(x, ctx)

                timed[f"{name}/{ssd_backend}"] = (fwd, ssd_backend)
                rows.append(measure(f"{name}/{ssd_backend}", L + nv, fwd, grad))
            os.environ.pop("M4V_SSD_BACKEND", None)
        if dev.type == "cuda":
            timed["attention/cudnn"] = (lambda: attn(x, rope, SDPBackend.CUDNN_ATTENTION), None)
        if args.cuda_graphs and dev.type == "cuda" and L + nv in args.compile_tokens:
            for name, (fn, ssd_backend) in timed.items():
                if ssd_backend == "torch":
                    continue
                if ssd_backend is not None:
                    os.environ["M4V_SSD_BACKEND"] = ssd_backend
                module = attn if name.startswith("attention") else mixers[name.split("/")[0]]
                rows.append(graphed_row(name, fn, module, x, grad, L + nv))
                print(rows[-1], flush=True)
                os.environ.pop("M4V_SSD_BACKEND", None)
        for mode in args.compile if L + nv in args.compile_tokens else []:
            for name, (fn, ssd_backend) in timed.items():
                if ssd_backend == "torch" and dev.type == "cuda":
                    continue
                if ssd_backend is not None:
                    os.environ["M4V_SSD_BACKEND"] = ssd_backend
                t0 = time.perf_counter()
                try:
                    compiled = torch.compile(fn, mode=mode, dynamic=False)
                    compiled().backward(grad)
                    compile_s = time.perf_counter() - t0
                    row = measure(f"{name} compiled:{mode}", L + nv, compiled, grad)
                    row["compile_s"] = compile_s
                except Exception as e:  # noqa: BLE001 - report any compile failure as a row
                    row = dict(layer=f"{name} compiled:{mode}", tokens=L + nv, error=str(e).splitlines()[0])
                rows.append(row)
                print(row, flush=True)
                write_json(args.out, dict(environment(), benchmark="mixer layers (issue 5b)", dim=D, heads=H,
                                          rows=rows, partial=True))
                os.environ.pop("M4V_SSD_BACKEND", None)
        torch.cuda.empty_cache()
    write_json(args.out, dict(environment(), benchmark="mixer layers (issue 5b)", dim=D, heads=H, rows=rows))
    print(f"{'layer':<40} {'tokens':>7} {'fwd ms':>8} {'fwd+bwd ms':>11} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['layer']:<40} {r['tokens']:>7} error: {r['error'][:60]}")
        elif "fwd_bwd_ms" not in r:
            print(f"{r['layer']:<40} {r['tokens']:>7} {r['fwd_ms']:>8.3f}")
        else:
            print(f"{r['layer']:<40} {r['tokens']:>7} {r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>11.3f} "
                  f"{r['peak_gib_fwd_bwd']:>9.2f}")


if __name__ == "__main__":
    main()
