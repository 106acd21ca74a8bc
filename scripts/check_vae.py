"""How much of Moving Shapes survives a VAE round trip (the ceiling of any model generating through it).

Encodes (posterior mean) and decodes held-out clips and reports the squared error on object pixels and on
background pixels, and the Moving-Shapes analyser's accuracy on the original clips and on their
reconstructions (m4v.eval.shapes). A VAE that drops objects scores a low background error and 0% accuracy.

    python scripts/check_vae.py runs/vae_moving_shapes/final/vae --num 48 --device cuda --out check.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from m4v.data.moving_shapes import BACKGROUND_RGB, MovingShapes
from m4v.eval.shapes import analyse, score, summarise
from m4v.models.vae import VideoVAE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vae", help="a VideoVAE folder")
    ap.add_argument("--num", type=int, default=48, help="held-out clips (default 48)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args()
    vae = VideoVAE.from_pretrained(args.vae).to(args.device).float()
    ds = MovingShapes(args.num, args.size, args.size, args.frames, seed=1, split="heldout", max_objects=2)
    obj_err, bg_err, truth, recon = [], [], [], []
    for start in range(0, args.num, args.batch):
        items = [ds[i] for i in range(start, min(start + args.batch, args.num))]
        video = torch.stack([it["video"] for it in items])  # [B, 3, F, H, W] in [-1, 1]
        with torch.no_grad():
            rec = vae.decode(vae.encode(video, sample=False)).float().cpu()
        rgb = torch.tensor([BACKGROUND_RGB[it["meta"]["background"]] for it in items], dtype=torch.float32)
        bg = (rgb / 127.5 - 1).view(-1, 3, 1, 1, 1)  # the background colour in [-1, 1]
        mask = ((video - bg).abs().sum(1, keepdim=True) > 0.1).expand_as(video)
        sq = (rec - video).square()
        obj_err.append(sq[mask].mean().item())
        bg_err.append(sq[~mask].mean().item())
        for it, r in zip(items, rec):
            for frames, bucket in ((it["video"], truth), (r, recon)):  # analyse takes [F, H, W, 3] in [0, 1]
                bucket.append(score(analyse(((frames + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0).numpy()), it["meta"]))
    report = {
        "vae": args.vae, "clips": args.num, "size": args.size, "frames": args.frames,
        "object_mse": float(np.mean(obj_err)), "background_mse": float(np.mean(bg_err)),
        "accuracy_original": summarise(truth), "accuracy_reconstruction": summarise(recon),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
