"""VAE decode: our AutoencoderKL vs diffusers' on the same random weights.

    python benchmarks/vae.py [--repeats 5] [--threads 2]

Two configs: "tiny" (block_out_channels 8, 8, 16, 16, one resnet per level: the test
fixture) and "small" (32, 64, 64, 64, two resnets per level, SD's layout at reduced
width), decoding one latent to 128² and to 512². Table: ms per decode, median of N with
(min–max), and diffusers / ours (the two alternate, run by run); plus the import cost of each module in a new process.
Outputs are checked equal (max-abs ≤ 1e-5) before timing. A third column runs ours in
channels-last layout (`set_channels_last()`, what `PixArtPipeline` uses; equal to 1e-4 of the
output's range).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from pixforge.eval.bench import interleaved, median_range

from pixforge.models.vae import AutoencoderKL

BASE = dict(
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    sample_size=512,
)
CONFIGS = {
    "tiny": dict(BASE, block_out_channels=[8, 8, 16, 16], norm_num_groups=8, layers_per_block=1),
    "small": dict(BASE, block_out_channels=[32, 64, 64, 64], norm_num_groups=32, layers_per_block=2),
}


def fmt(values: list[float]) -> str:
    return median_range(values, 1)


def process_time(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"median of {args.repeats} (min–max)\n")
    print("| VAE | image | diffusers ms | ours ms | ours, channels-last ms | diffusers / ours (median) | "
          "diffusers / ours channels-last (median) | (min) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        reference = DiffusersAutoencoderKL(**config).eval()
        with tempfile.TemporaryDirectory() as folder:
            reference.save_pretrained(folder)
            ours = AutoencoderKL.from_pretrained(folder)
            nhwc = AutoencoderKL.from_pretrained(folder).set_channels_last()
        for size in (128, 512):
            z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                expected = reference.decode(z).sample
                diff = (ours.decode(z) - expected).abs().max().item()
                assert diff <= 1e-5, diff
                # other kernels, other rounding: 1.3e-4 abs at 512² on outputs up to 5.8 (random weights)
                assert (nhwc.decode(z) - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
                times = interleaved({"diffusers": lambda: reference.decode(z).sample, "ours": lambda: ours.decode(z),
                                     "nhwc": lambda: nhwc.decode(z)}, args.repeats)
            theirs, mine, last = ([t * 1e3 for t in times[key]] for key in ("diffusers", "ours", "nhwc"))
            ratio = statistics.median(theirs) / statistics.median(mine)
            ratio_nhwc = statistics.median(theirs) / statistics.median(last)
            print(f"| {name} | {size}² | {fmt(theirs)} | {fmt(mine)} | {fmt(last)} | {ratio:.2f}x | {ratio_nhwc:.2f}x | "
                  f"{min(theirs) / min(mine):.2f}x / {min(theirs) / min(last):.2f}x |", flush=True)

    theirs, mine = [], []
    for _ in range(args.repeats):  # alternated, like the decode timings
        theirs.append(process_time("from diffusers import AutoencoderKL"))
        mine.append(process_time("from pixforge.models.vae import AutoencoderKL"))
    ratio = statistics.median(theirs) / statistics.median(mine)
    print("\n| new process | diffusers s | ours s | diffusers / ours |")
    print("|---|---|---|---|")
    print(f"| import AutoencoderKL | {statistics.median(theirs):.2f} ({min(theirs):.2f}–{max(theirs):.2f}) | "
          f"{statistics.median(mine):.2f} ({min(mine):.2f}–{max(mine):.2f}) | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
