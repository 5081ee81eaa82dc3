"""In-domain FID/KID sanity: real vs real (two disjoint test samples) and real vs degraded renders.

    python benchmarks/shapes_fid.py --n 500
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pixforge.eval.metrics import fid, kid, load_feature_net
from pixforge.shapes import degrade
from pixforge.shapes.world import WorldConfig, sample

CANVASES = ((128, 128), (144, 112), (112, 144), (160, 96), (96, 160))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="images per side")
    args = parser.parse_args()
    torch.manual_seed(0)
    net = load_feature_net()
    config = WorldConfig(canvas_sizes=CANVASES, background_prob=0.3)
    real = [sample(i, "test", config).image for i in range(args.n)]
    other = [sample(i + args.n, "test", config).image for i in range(args.n)]
    start = time.perf_counter()
    print(f"in-domain FID/KID, {args.n} vs {args.n} test renders (disjoint), five canvas sizes")
    print("| second set | FID | KID ×1e3 (mean ± std) |")
    print("|---|---|---|")
    for strength in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):
        fake = [degrade.degrade(im, strength, np.random.default_rng(i)) for i, im in enumerate(other)]
        mean, std = kid(real, fake, net, subset_size=min(100, args.n), subsets=50)
        label = "real (disjoint)" if strength == 0 else f"degraded, strength {strength}"
        print(f"| {label} | {fid(real, fake, net):.3f} | {1e3 * mean:.2f} ± {1e3 * std:.2f} |")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
