"""Issue 5 (c): the frame-causal joint attention, dense-mask SDPA against FlexAttention, at one generation shape.

The shape of the last step of a 241-frame 768x1280 generation (batch 2 for guidance, 30 heads of 64, bf16):
128 text tokens (one prompt padded after 16), 28 history frames at 12x20, one at 24x40, one at 48x80 and the
current frame at 48x80 = 15488 tokens. Times mask building, forward and forward+backward of
``m4v.layers.attention.attention`` with the dense boolean mask (``frame_causal_mask``, SDPA) and with the
``BlockMask`` (``frame_causal_block_mask``, compiled FlexAttention), and the forward of
``torch.compile(flex_attention)`` with static, dynamic and automatic shapes (a generation meets 93 shapes, so
the compiled kernel runs with dynamic shapes after the second). GPU only.

    PYTHONPATH=. python benchmarks/bench_attention_flex.py --out benchmarks/results/attention_flex.json
    PYTHONPATH=. python benchmarks/bench_attention_flex.py --device cpu --scale 4 --history 3   # smoke run
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import bench, environment, write_json  # noqa: E402

from m4v.layers.attention import attention, frame_causal_block_mask, frame_causal_mask  # noqa: E402

LAST_STEP_241 = [(12, 20)] * 28 + [(24, 40), (48, 80), (48, 80)]  # (h, w) of every frame's tokens


def frame_ids(sizes: list[tuple[int, int]], device: str, text_len: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token frame id (-1 for text) and key validity (batch 2, the first prompt padded after 16 tokens)."""
    ids = torch.cat([torch.full((text_len,), -1)] + [torch.full((h * w,), f) for f, (h, w) in enumerate(sizes)])
    valid = torch.ones(2, ids.numel(), dtype=torch.bool)
    valid[0, 16:text_len] = False
    return ids.to(device), valid.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--history", type=int, nargs="+", default=[28, 10], help="history frames at 12x20 (shapes)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (eager flex, no compiled rows); use --scale")
    ap.add_argument("--scale", type=int, default=1, help="divide every frame's height and width by this")
    args = ap.parse_args()
    dev, s = args.device, args.scale
    if dev.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_attention_flex.py: no CUDA device here (--device cpu --scale 4 for a smoke run)")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    rows = []
    static = torch.compile(flex_attention, dynamic=False)
    dynamic = torch.compile(flex_attention, dynamic=True)
    for n_hist in args.history:
        ids, valid = frame_ids([(h // s, w // s) for h, w in [(12, 20)] * n_hist + LAST_STEP_241[-3:]], dev)
        N = ids.numel()
        dense, block = frame_causal_mask(ids, valid), frame_causal_block_mask(ids, valid)
        q, k, v = (torch.randn(2, 30, N, 64, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(2, N, 30 * 64, device=dev, dtype=dtype)  # attention() returns [B, N, heads * dim]
        row = dict(tokens=N, block_sparsity_percent=float(block.sparsity()))
        row["dense_mask_build_ms"] = bench(lambda: frame_causal_mask(ids, valid))  # noqa: B023
        row["block_mask_build_ms"] = bench(lambda: frame_causal_block_mask(ids, valid))  # noqa: B023
        qd, kd, vd = q.detach(), k.detach(), v.detach()  # forward rows: plain inference inputs
        with torch.no_grad():
            diff = attention(qd, kd, vd, dense) - attention(qd, kd, vd, block)
            row["max_abs_diff_flex_vs_sdpa"] = diff.abs().max().item()
            for name, mask in (("sdpa_dense", dense), ("flex", block), ("sdpa_no_mask", None)):
                row[f"{name}_fwd_ms"] = bench(lambda m=mask: attention(qd, kd, vd, m))
            if dev.startswith("cuda"):
                row["flex_static_fwd_ms"] = bench(lambda: static(qd, kd, vd, block_mask=block))  # noqa: B023
                row["flex_dynamic_fwd_ms"] = bench(lambda: dynamic(qd, kd, vd, block_mask=block))  # noqa: B023
        for name, mask in (("sdpa_dense", dense), ("flex", block), ("sdpa_no_mask", None)):
            if name == "flex" and not dev.startswith("cuda"):
                continue  # FlexAttention has no backward off CUDA
            row[f"{name}_fwdbwd_ms"] = bench(lambda m=mask: attention(q, k, v, m).backward(grad))
        rows.append(row)
        print({k: round(x, 3) if isinstance(x, float) else x for k, x in row.items()}, flush=True)
        write_json(args.out, dict(environment(), benchmark="frame-causal attention: SDPA vs FlexAttention", rows=rows))


if __name__ == "__main__":
    main()
