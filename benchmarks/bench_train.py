"""Training throughput (tokens/s) of the M4V transformer: full_temp vs full_attn, tiny and mid-size configs.

One optimizer step = the real pyramidal flow-matching objective (temporal-pyramid history, corruption,
text dropout), forward + backward under bf16 autocast (fp32 on CPU), gradient clipping, AdamW and EMA.
Synthetic latents and text features stand in for the data (no VAE / text encoder / video decoding), so
the number is the model's training throughput. The clip is ``--frames`` long at ``--height x --width``
and the step is timed at each pyramid stage for frame ``--frame-index`` (default: the last latent
frame); the reported tokens/s weights the stages 1:2:1 as training does (sum of tokens / sum of time).

    PYTHONPATH=. python benchmarks/bench_train.py --out benchmarks/results/train_h100.json
    # FSDP2, 1 vs 2 GPUs of one host (per-GPU batch fixed; the JSON of rank 0 has the total tokens/s):
    torchrun --nproc_per_node 1 benchmarks/bench_train.py --fsdp --configs mid --out benchmarks/results/train_fsdp1.json
    torchrun --nproc_per_node 2 benchmarks/bench_train.py --fsdp --configs mid --out benchmarks/results/train_fsdp2.json
    # end to end (data + VAE + text encoder + trainer) for a training YAML:
    PYTHONPATH=. python benchmarks/bench_train.py --end-to-end configs/train_tiny.yaml --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, peak_memory, write_json  # noqa: E402

from m4v.models import M4VTransformer, named_config  # noqa: E402
from m4v.models.text_encoders import TextEmbeddings  # noqa: E402
from m4v.training.distributed import init_distributed, shard_model  # noqa: E402
from m4v.training.ema import EMA  # noqa: E402
from m4v.training.objective import PyramidFlowObjective, token_count  # noqa: E402
from m4v.training.optim import no_decay_names  # noqa: E402

warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(name="tiny", overrides={}),
    # mid-size: the paper's block design at width 1024 (16 heads x 64), 4 dual + 8 single blocks, T5-width text
    "mid": dict(
        name="m4v-768p",
        overrides=dict(width=1024, num_heads=16, num_dual_layers=4, num_single_layers=8),
    ),
    "m4v-768p": dict(name="m4v-768p", overrides={}),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_layout(args: argparse.Namespace, config: str, layout: str, info: Any) -> dict[str, Any]:
    spec = CONFIGS[config]
    cfg = named_config(spec["name"], layout=layout, **spec["overrides"])
    dev = info.device
    torch.manual_seed(0)
    model = M4VTransformer(**cfg).to(dev)
    exempt = no_decay_names(model)
    if args.grad_ckpt:
        model.enable_gradient_checkpointing()
    if args.fsdp:
        shard_model(model, info)
    if args.compile:
        for block in [*model.dual_blocks, *model.single_blocks]:
            block.compile()
    params = dict(model.named_parameters())
    groups = [
        {"params": [p for n, p in params.items() if n not in exempt], "weight_decay": 0.0},
        {"params": [p for n, p in params.items() if n in exempt], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))
    ema = EMA(model, 0.9999)
    objective = PyramidFlowObjective(text_dropout=0.1)
    B, C = args.batch, cfg["in_channels"]
    T = (args.frames - 1) // 8 + 1
    frame = T - 1 if args.frame_index is None else args.frame_index
    h, w = args.height // 8, args.width // 8
    latents = torch.randn(B, C, frame + 1, h, w, device=dev)
    text = TextEmbeddings(
        torch.randn(B, args.text_len, cfg["text_dim"], device=dev),
        torch.ones(B, args.text_len, dtype=torch.bool, device=dev),
        torch.randn(B, cfg["pooled_dim"], device=dev),
    )
    null = TextEmbeddings(text.token_states[:1, :2], text.attention_mask[:1, :2], text.pooled[:1])
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()

    def step(stage: int, k: int) -> int:
        gens = [torch.Generator().manual_seed(1000 * k + j) for j in range(B)]
        inputs = objective.prepare(latents, frame, stage, text, null, gens)
        with amp:
            loss = objective.loss(model, inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, k)
        sizes = [(x.shape[-2], x.shape[-1]) for x in inputs.history] + [tuple(inputs.noisy.shape[-2:])]
        return B * token_count(sizes, args.text_len, cfg["patch_size"])

    per_stage = []
    total_tokens, total_time = 0.0, 0.0
    for stage, weight in zip(range(3), (1, 2, 1)):
        for k in range(args.warmup):
            step(stage, k)
        _sync(dev)
        times, tokens = [], 0
        for k in range(args.steps):
            t0 = time.perf_counter()
            tokens = step(stage, args.warmup + k)
            _sync(dev)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        per_stage.append(dict(stage=stage, tokens_per_rank=tokens, step_s=t, tokens_per_s=info.world * tokens / t))
        total_tokens += weight * tokens * info.world
        total_time += weight * t
    mem = peak_memory(lambda: step(2, 10_000)) if dev.type == "cuda" else None
    n_params = sum(p.numel() for p in M4VTransformer(**cfg).parameters()) if not args.fsdp else None
    return dict(
        config=config, layout=layout, params=n_params, batch_per_rank=B, world_size=info.world,
        height=args.height, width=args.width, frames=args.frames, frame_index=frame, text_len=args.text_len,
        grad_ckpt=args.grad_ckpt, compile=args.compile, fsdp=args.fsdp, peak_mem_gib=mem,
        tokens_per_s=total_tokens / total_time, per_stage=per_stage,
    )


def end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    from m4v.training.config import load_config
    from m4v.training.trainer import Trainer

    cfg = load_config(args.end_to_end, {"checkpoint.resume": "none", "checkpoint.export_final": False})
    cfg.output_dir = args.e2e_output
    cfg.checkpoint.every = 10**9
    trainer = Trainer(cfg)
    hist = trainer.train(stop_at=args.warmup + args.steps)[args.warmup :]
    tps = [r["tokens_per_s"] for r in hist]
    return dict(config=args.end_to_end, steps=len(hist), tokens_per_s_median=statistics.median(tps),
                step_s_median=statistics.median(r["step_time"] for r in hist), world_size=trainer.info.world)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON file (written by rank 0)")
    ap.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=list(CONFIGS))
    ap.add_argument("--layouts", nargs="+", default=["full_temp", "full_attn"])
    ap.add_argument("--batch", type=int, default=None, help="per-rank batch (default 8 tiny, 2 otherwise)")
    ap.add_argument("--height", type=int, default=None, help="pixels (default 64 tiny, 384 otherwise)")
    ap.add_argument("--width", type=int, default=None, help="pixels (default 64 tiny, 640 otherwise)")
    ap.add_argument("--frames", type=int, default=None, help="clip length 1+8k (default 17 tiny, 57 otherwise)")
    ap.add_argument("--frame-index", type=int, default=None)
    ap.add_argument("--text-len", type=int, default=None, help="text tokens (default 16 tiny, 128 otherwise)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 under torchrun (run with --nproc_per_node 1 and 2)")
    ap.add_argument("--end-to-end", metavar="YAML", help="time the full Trainer on a training config instead")
    ap.add_argument("--e2e-output", default="/tmp/m4v_bench_train", help="output_dir of the end-to-end run")
    args = ap.parse_args()
    info = init_distributed()
    results = []
    try:
        if args.end_to_end:
            results.append(end_to_end(args))
        else:
            for config in args.configs:
                tiny = config == "tiny"
                run = argparse.Namespace(**vars(args))
                run.batch = args.batch or (8 if tiny else 2)
                run.height = args.height or (64 if tiny else 384)
                run.width = args.width or (64 if tiny else 640)
                run.frames = args.frames or (17 if tiny else 57)
                run.text_len = args.text_len or (16 if tiny else 128)
                for layout in args.layouts:
                    r = bench_layout(run, config, layout, info)
                    results.append(r)
                    if info.is_main:
                        mem = "" if r["peak_mem_gib"] is None else f" (peak {r['peak_mem_gib']:.1f} GiB)"
                        print(f"{config:9s} {layout:10s} world {info.world}: {r['tokens_per_s']:,.0f} tokens/s{mem}",
                              flush=True)
    finally:
        if info.distributed and dist.is_initialized():
            dist.destroy_process_group()
    if info.is_main:
        write_json(args.out, dict(environment(), benchmark="train_throughput", results=results))


if __name__ == "__main__":
    main()
