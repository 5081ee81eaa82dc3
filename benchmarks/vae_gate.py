"""The VAE gate: does a trained VAE reconstruct shapes-world test renders well enough that a
transformer trained on its latents can pass the compositional checker?

    python benchmarks/vae_gate.py runs/vae/final/vae --n 300
    python benchmarks/vae_gate.py runs/vae --n 100      # a run in progress: newest checkpoint

Prints PSNR (mean, min) and the checker's pass rate on the reconstructions (and on the
renders themselves, the ceiling), per category, and the decoder's artifact on flat canvases
(each background colour of the world, encoded and decoded: any pixel away from the flat colour
is a spot the decoder paints into every image). The default-model recipe trains the
transformer only when the reconstructions pass >= 99%.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict

import numpy as np
import torch

from pixforge.eval.shapes import check
from pixforge.models.vae import AutoencoderKL
from pixforge.shapes.world import BACKGROUNDS, WorldConfig, sample
from pixforge.train.data import bucket_sizes, to_tensor


def load_vae(path: str):
    """A VAE folder, or a training run folder (its newest checkpoint's EMA weights)."""
    from pathlib import Path

    if (Path(path) / "checkpoints").is_dir():
        from pixforge.train.export import model_from_run

        vae, step = model_from_run(path)
        print(f"{path}: EMA weights of step {step}")
        return vae
    return AutoencoderKL.from_pretrained(path)


@torch.no_grad()
def flat_artifact(vae, sizes) -> dict:
    """Max |decoded - flat colour| (0-255) over every background colour and size, the pixels
    off by more than 16, and where the worst one is (y, x, size)."""
    worst, over, where = 0.0, 0, None
    for width, height in sizes:
        for rgb in BACKGROUNDS.values():
            flat = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, height, width) / 127.5 - 1
            rebuilt = vae.decode(vae.encode(flat).mode()).clamp(-1, 1)
            error = ((rebuilt - flat) * 127.5).abs().amax(dim=1)[0]  # (h, w), worst channel
            over += int((error > 16).sum())
            if float(error.max()) > worst:
                worst = float(error.max())
                y, x = divmod(int(error.argmax()), width)
                where = (y, x, f"{width}x{height}")
    return {"max": worst, "pixels_over_16": over, "worst_at": where, "canvases": len(sizes) * len(BACKGROUNDS)}


def evaluate(vae_dir: str, n: int, resolution: int = 128, batch: int = 25) -> dict:
    vae = load_vae(vae_dir).eval()
    sizes = bucket_sizes(resolution)[:5]
    items = [sample(i, "test", WorldConfig(canvas_sizes=(sizes[i % len(sizes)],))) for i in range(n)]
    by_category = defaultdict(lambda: [0, 0, 0])  # renders passed, reconstructions passed, count
    psnrs = []
    failures = []
    start = time.time()
    by_size = defaultdict(list)
    for item in items:
        by_size[(item.scene.width, item.scene.height)].append(item)
    for group in by_size.values():
        for first in range(0, len(group), batch):
            chunk = group[first:first + batch]
            images = torch.stack([to_tensor(item.image) for item in chunk])
            with torch.no_grad():
                recon = vae.decode(vae.encode(images).mode()).clamp(-1, 1)
            for item, original, rebuilt in zip(chunk, images, recon):
                mse = ((rebuilt - original) / 2).pow(2).mean().item()
                psnrs.append(10 * math.log10(1.0 / max(mse, 1e-12)))
                array = ((rebuilt.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
                stats = by_category[item.scene.category]
                stats[0] += check(item.image, item.caption).passed
                outcome = check(array, item.caption)
                stats[1] += outcome.passed
                if not outcome.passed and len(failures) < 24:
                    failures.append(f"[{item.scene.category}] {item.caption!r}: {outcome.reason}")
                stats[2] += 1
    total = [sum(v[i] for v in by_category.values()) for i in range(3)]
    return {
        "n": n,
        "psnr_mean": float(np.mean(psnrs)),
        "psnr_min": float(np.min(psnrs)),
        "renders_pass": total[0] / total[2],
        "reconstructions_pass": total[1] / total[2],
        "per_category": {k: {"renders": v[0] / v[2], "reconstructions": v[1] / v[2], "n": v[2]} for k, v in sorted(by_category.items())},
        "flat_artifact": flat_artifact(vae, sizes),
        "seconds": time.time() - start,
        "failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vae_dir")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    result = evaluate(args.vae_dir, args.n)
    print(f"PSNR mean {result['psnr_mean']:.2f} dB (min {result['psnr_min']:.2f}) on {args.n} test renders")
    print(f"checker passes {100 * result['renders_pass']:.1f}% of renders, "
          f"{100 * result['reconstructions_pass']:.1f}% of reconstructions")
    for category, values in result["per_category"].items():
        print(f"  {category:<18} renders {100 * values['renders']:5.1f}%  reconstructions {100 * values['reconstructions']:5.1f}%  (n={values['n']})")
    flat = result["flat_artifact"]
    print(f"flat canvases ({flat['canvases']}): decoded max deviation {flat['max']:.0f}/255 at {flat['worst_at']}, "
          f"{flat['pixels_over_16']} pixels off by > 16")
    for failure in result["failures"]:
        print(f"  fail: {failure}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
