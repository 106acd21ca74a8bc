"""torch.compile(model) on the GPU path (issue "GPU speed": "torch.compile(model) works on the GPU path").

Builds the shipped default model's transformer config (layouts full_temp and full_attn, random non-zero
weights, float32 so the comparison is tight), runs forward + backward eagerly (Triton SSD / conv / norm kernels
chosen automatically on CUDA) and through ``torch.compile(model)`` (inductor), and records the relative RMS error
of the output and of all gradients, the compile time and the time per forward + backward of both. JSON out.

    python benchmarks/check_compile_gpu.py --out benchmarks/results/compile_gpu.json 2>&1 | tee compile.log

On a fresh H100 the first full_temp step JIT-compiles the Triton kernels and inductor then compiles the model:
a first try cut at 180 s (output piped through tail, so nothing came back) did not finish; give it a full call.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import bench, environment, write_json  # noqa: E402

from m4v.eval.flops import resolved_config  # noqa: E402
from m4v.models import M4VTransformer  # noqa: E402
from m4v.training.config import load_config  # noqa: E402


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().mean().sqrt() / b.double().square().mean().sqrt().clamp_min(1e-30))


def inputs(device: str, B: int = 4, size: int = 16, L: int = 13) -> dict:
    g = torch.Generator().manual_seed(0)
    q, h = size // 4, size // 2
    hist = [torch.randn(B, 16, q, q, generator=g), torch.randn(B, 16, h, h, generator=g)]
    mask = torch.arange(L)[None] < torch.tensor([L, L - 4, L - 2, L][:B])[:, None]
    kw = dict(hidden_states=torch.randn(B, 16, size, size, generator=g), timestep=torch.full((B,), 500.0),
              encoder_hidden_states=torch.randn(B, L, 384, generator=g),
              pooled_projections=torch.randn(B, 384, generator=g), encoder_attention_mask=mask, history=hist)
    return {k: ([t.to(device) for t in v] if isinstance(v, list) else v.to(device)) for k, v in kw.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/train_moving_shapes.yaml")
    ap.add_argument("--layouts", default="full_temp,full_attn")
    ap.add_argument("--out")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = load_config(args.config).model
    rows = []
    for layout in args.layouts.split(","):
        row: dict = {"layout": layout}
        try:
            torch.manual_seed(0)
            model = M4VTransformer(**resolved_config(m.config, **{**m.overrides, "layout": layout})).to(device)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.ndim >= 2 or (name.endswith("bias") and "dt_bias" not in name):
                        p.normal_(0, 0.05)
            kw = inputs(device)

            def step(fn):  # noqa: ANN001, ANN202
                model.zero_grad(set_to_none=True)
                out = fn(**kw).sample
                out.square().mean().backward()
                return out.detach(), [p.grad.detach().clone() for p in model.parameters()]

            t0 = time.perf_counter()
            ref, ref_g = step(model)
            print(f"{layout}: first eager step (Triton JIT included) {time.perf_counter() - t0:.1f} s", flush=True)
            compiled = torch.compile(model)
            t0 = time.perf_counter()
            got, got_g = step(compiled)
            if device == "cuda":
                torch.cuda.synchronize()
            row["compile_s"] = time.perf_counter() - t0
            row["out_rel_rms"] = rel_rms(got, ref)
            row["grad_rel_rms_max"] = max(rel_rms(a, b) for a, b in zip(got_g, ref_g))
            row["eager_ms"] = bench(lambda: step(model), warmup=2, rep=10)
            row["compiled_ms"] = bench(lambda: step(compiled), warmup=2, rep=10)
            row["ok"] = row["out_rel_rms"] < 1e-3 and row["grad_rel_rms_max"] < 1e-2
        except Exception as e:  # noqa: BLE001 - record and go on
            row["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()[-2000:]
            row["ok"] = False
        print(row, flush=True)
        rows.append(row)
        write_json(args.out, {**environment(), "rows": rows})  # after every row: a run cut short keeps its rows


if __name__ == "__main__":
    main()
