"""Issue 5 (c): end-to-end text-to-video generation time at 768x1280, 121 and 241 frames, full_temp vs full_attn.

Random weights at the ``m4v-768p`` config (2.2B), bf16, PyramidFlow's schedule: the first latent frame
20+20+20 Euler steps, later frames 10+10+10, classifier-free guidance (batch 2), 128 text tokens.
The transformer's time depends only on the input shapes, so every distinct (frame, stage) shape of the
autoregressive schedule is run and timed (median of ``--reps`` after a warm-up) and multiplied by its
number of steps; the sum is the generation's transformer time, the VAE decode of the whole video is
timed once.  ``--attention sdpa,flex`` times each attention backend (``M4V_ATTENTION``: dense-mask SDPA or
FlexAttention's block-sparse temporal-causal mask) per layout; each JSON row records its backend.
``--cuda-graphs off,on`` times eager forwards and/or the pipeline's CUDA graphs (``m4v.models.cuda_graphs``: per
shape up to its token limit the first call runs eagerly and captures, timed once with host synchronisation, the
other steps replay; larger shapes run eagerly; ``--graph-tokens`` overrides the limit).
The pseudo-layout ``no_mixer`` is full_attn with every single-stream block's mixer returning zeros: the time
left when the single-stream mixers cost nothing, so full_attn / no_mixer bounds any full_temp speed-up.

    PYTHONPATH=. python benchmarks/bench_generate.py --out benchmarks/results/generate.json
    PYTHONPATH=. python benchmarks/bench_generate.py --frames 241 --attention sdpa,flex
    PYTHONPATH=. python benchmarks/bench_generate.py --frames 241 --layouts full_temp full_attn no_mixer \
        --cuda-graphs on
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import bench, environment, write_json  # noqa: E402

from m4v.eval.flops import generation_flops, resolved_config  # noqa: E402
from m4v.layers.attention import attention_backend  # noqa: E402
from m4v.models import M4VTransformer, named_config  # noqa: E402
from m4v.models.cuda_graphs import CUDAGraphTransformer  # noqa: E402
from m4v.schedulers import temporal_pyramid_history  # noqa: E402


def schedule(num_frames: int, first: int = 20, later: int = 10, stages: int = 3):
    """(frame index, stage, steps) of the autoregressive pyramid."""
    T = 1 + (num_frames - 1) // 8
    return [(n, s, first if n == 0 else later) for n in range(T) for s in range(stages)]


def without_single_mixers(model: M4VTransformer) -> M4VTransformer:
    """The ``no_mixer`` floor: every single-stream block's token mixer returns zeros (adaLN, MLP, dual blocks stay)."""
    for block in model.single_blocks:
        block.mix = lambda h, ctx: torch.zeros_like(h)
    return model


def model_layout(layout: str) -> str:
    """The model layout behind a benchmark layout (``no_mixer``: full_attn without its single-stream mixers)."""
    return "full_attn" if layout == "no_mixer" else layout


def build(config: str, layout: str, device: str) -> M4VTransformer:
    with torch.device(device):
        model = M4VTransformer(**named_config(config, layout=model_layout(layout)))
    model = model.to(torch.bfloat16 if device.startswith("cuda") else torch.float32).eval()
    return without_single_mixers(model) if layout == "no_mixer" else model


def transformer_time(  # noqa: ANN001
    model, num_frames: int, h: int, w: int, reps: int, text_len: int = 128, graphs: bool = False,
    graph_tokens: int | None = None,
) -> dict:
    dev, dt = next(model.parameters()).device, next(model.parameters()).dtype
    B, C = 2, model.config.in_channels
    txt = torch.randn(B, text_len, model.config.text_dim, device=dev, dtype=dt)
    mask = torch.ones(B, text_len, dtype=torch.bool, device=dev)
    mask[0, 16:] = False  # the unconditional (empty) prompt is short: padding is exercised
    pooled = torch.randn(B, model.config.pooled_dim, device=dev, dtype=dt)
    total_ms, per_shape = 0.0, []
    clean: list[torch.Tensor] = []
    for n, stage, steps in schedule(num_frames):
        if stage == 0 and n > 0:
            clean.append(torch.randn(B, C, h, w, device=dev, dtype=dt))
        hist = temporal_pyramid_history(clean, stage)
        f = 2 ** (2 - stage)
        x = torch.randn(B, C, h // f, w // f, device=dev, dtype=dt)
        t = torch.full((B,), 500.0, device=dev)
        first = None
        with torch.no_grad():
            graphed = None
            if graphs:
                graphed = CUDAGraphTransformer(model, txt, pooled, mask, max_graphs=1, max_tokens=graph_tokens)
            if graphed is None or not graphed.uses_graph(x, hist):  # eager (the pipeline's too, over the limit)
                ms = bench(lambda: model(x, t, txt, pooled, mask, history=hist), warmup=1, rep=reps)
                total_ms += steps * ms
            else:
                model(x, t, txt, pooled, mask, history=hist)  # one-time set-up, as the eager warm-up
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                graphed(x, t, hist)  # eager forward + capture
                torch.cuda.synchronize()
                first = 1e3 * (time.perf_counter() - t0)
                ms = bench(lambda: graphed(x, t, hist), warmup=1, rep=reps)  # replays
                total_ms += first + (steps - 1) * ms
                del graphed
        per_shape.append(
            dict(
                frame=n,
                stage=stage,
                steps=steps,
                ms=ms,
                first_call_ms=first,
                tokens=text_len + sum((a.shape[-2] // 2) * (a.shape[-1] // 2) for a in [*hist, x]),
            )
        )
    return dict(transformer_s=total_ms / 1e3, per_shape=per_shape)


def vae_time(num_frames: int, h: int, w: int) -> dict:
    from m4v.models.vae import build_video_vae

    vae = build_video_vae("m4v-768p").to("cuda", torch.bfloat16)
    T = 1 + (num_frames - 1) // 8
    lat = torch.randn(1, 16, T, h, w, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        vae.decode(lat, chunk_latents=2)
    torch.cuda.synchronize()
    return dict(vae_decode_s=time.perf_counter() - t0, vae_peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def backends(text: str) -> list[str]:
    """Parse ``--attention``: a comma list of attention backends (sdpa, flex)."""
    try:
        return [attention_backend(name.strip()) for name in text.split(",") if name.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("M4V_ATTENTION", "--attention")) from e


def on_off(text: str) -> list[bool]:
    """Parse ``--cuda-graphs``: a comma list of off, on."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words or any(w not in ("off", "on") for w in words):
        raise argparse.ArgumentTypeError(f"expected a comma list of off, on; got {text!r}")
    return [w == "on" for w in words]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--frames", type=int, nargs="+", default=[241, 121])
    ap.add_argument("--layouts", nargs="+", default=["full_temp", "full_attn"], help="layouts, or no_mixer (the floor)")
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--vae", action="store_true", help="also time the paper-scale VAE decode")
    ap.add_argument("--config", default="m4v-768p")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attention", type=backends, default=["sdpa"], help="comma list of sdpa, flex (default sdpa)")
    ap.add_argument("--cuda-graphs", type=on_off, default=[False], help="comma list of off, on (default off)")
    ap.add_argument("--graph-tokens", type=int, default=None, help="largest captured shape (default: the pipeline's)")
    args = ap.parse_args()
    h, w = args.height // 8, args.width // 8
    rows = []
    for layout in args.layouts:
        model = build(args.config, layout, args.device)
        for attn in args.attention:
            os.environ["M4V_ATTENTION"] = attn  # read by every forward's SequenceContext
            for graphs in args.cuda_graphs:
                for nf in args.frames:
                    if torch.cuda.is_available():
                        torch.cuda.reset_peak_memory_stats()
                    compiled = counters["stats"]["unique_graphs"]
                    r = transformer_time(model, nf, h, w, args.reps, graphs=graphs, graph_tokens=args.graph_tokens)
                    r["compiled_graphs"] = counters["stats"]["unique_graphs"] - compiled  # flex recompiles show here
                    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
                    cfg = resolved_config(args.config, layout=model_layout(layout))
                    flops = generation_flops(cfg, args.height, args.width, nf, mixers=layout != "no_mixer").total
                    r.update(layout=layout, attention=attn, cuda_graphs=graphs, frames=nf, peak_gib=peak,
                             pflops=2 * flops / 1e15)  # the guidance batch of 2
                    rows.append(r)
                    write_json(args.out, dict(environment(), benchmark="end-to-end generation (issue 5c)", rows=rows))
                    print(
                        f"{layout:<10} {attn:<5} graphs {'on' if graphs else 'off':<3} {nf:>4} frames: transformer "
                        f"{r['transformer_s']:8.1f} s  peak {r['peak_gib']:.1f} GiB  compiled graphs "
                        f"{r['compiled_graphs']}",
                        flush=True,
                    )
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    vae = {nf: vae_time(nf, h, w) for nf in args.frames} if args.vae else {}
    write_json(args.out, dict(environment(), benchmark="end-to-end generation (issue 5c)", rows=rows, vae=vae))
    print(f"\n{'layout':<10} {'attn':<5} {'graphs':<6} {'frames':>6} {'transformer s':>14} {'peak GiB':>9}")
    for r in rows:
        graphs = "on" if r["cuda_graphs"] else "off"
        print(f"{r['layout']:<10} {r['attention']:<5} {graphs:<6} {r['frames']:>6} ", end="")
        print(f"{r['transformer_s']:>14.1f} {r['peak_gib']:>9.1f}")
    for attn in args.attention:
        for graphs in args.cuda_graphs:
            for nf in args.frames:
                t = {r["layout"]: r["transformer_s"] for r in rows
                     if r["frames"] == nf and r["attention"] == attn and r["cuda_graphs"] == graphs}
                what = f"at {nf} frames ({attn}, CUDA graphs {'on' if graphs else 'off'})"
                fl = {r["layout"]: r["pflops"] for r in rows if r["frames"] == nf}
                if "full_attn" in t and "full_temp" in t:
                    print(f"speed-up full_temp vs full_attn {what}: {t['full_attn'] / t['full_temp']:.2f}x "
                          f"(FLOP ratio {fl['full_attn'] / fl['full_temp']:.2f}x)")
                if "full_attn" in t and "no_mixer" in t:
                    print(f"ceiling (single-stream mixers free) {what}: {t['full_attn'] / t['no_mixer']:.2f}x "
                          f"(FLOP ratio {fl['full_attn'] / fl['no_mixer']:.2f}x)")
    for layout in args.layouts:
        for nf in args.frames:
            for key, a, b in (("attention", "sdpa", "flex"), ("cuda_graphs", False, True)):
                t = {r[key]: r["transformer_s"] for r in rows if r["frames"] == nf and r["layout"] == layout}
                if a in t and b in t and len(t) == 2:
                    print(f"speed-up {key} {b} vs {a} for {layout} at {nf} frames: {t[a] / t[b]:.2f}x")
    for nf, v in vae.items():
        print(f"VAE decode {nf} frames: {v['vae_decode_s']:.1f} s, peak {v['vae_peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
