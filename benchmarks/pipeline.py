"""End-to-end text-to-image: pixforge's PixArtPipeline vs diffusers' PixArtAlphaPipeline.

    python benchmarks/pipeline.py [--repeats 5] [--threads 2] [--models tiny,B/2] [--precision fp32|bf16]

Both pipelines load the same random-weight folder (tiny T5 with an in-memory tokenizer,
tiny AutoencoderKL, and a PixArt transformer: the tiny test model at 128², or a
DiT-B/2-sized one — hidden 768, 12 layers, 12 heads — at 256²). Each run is one whole
call: encode prompt + negative, 20 DPM-Solver++ steps with CFG 4.5 (batched
[uncond, cond]), VAE decode, PIL image. The two pipelines alternate run by run so both
see the same background load; the table shows seconds, median of N (min–max), and
diffusers / ours on the medians and on the minima. "max |Δ|" is the largest difference
between the two images in [0, 1] (exact mode: the same output).

--precision bf16 runs both in bfloat16: diffusers' whole pipeline cast with `.to(torch.bfloat16)`,
ours with `precision="bf16"` (the transformer in bf16; the tiny T5 and VAE stay fp32). Outputs
then differ by bf16 rounding accumulated over the steps, shown in the last column.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pixforge.eval.bench import median_range, timed_pair

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.tiny_pipeline import build_diffusers_pipeline  # noqa: E402

from pixforge.sampling.pipeline import PixArtPipeline  # noqa: E402

MODELS = {
    # name: (transformer overrides, image side)
    "tiny": ({}, 128),
    "B/2": (dict(num_attention_heads=12, attention_head_dim=64, cross_attention_dim=768, num_layers=12,
                 sample_size=32), 256),
}
PROMPT, NEGATIVE, STEPS, GUIDANCE, SEED = "two blue squares above a yellow star", "", 20, 4.5, 0
MAX_LENGTH = 32


def fmt(values: list[float]) -> str:
    return median_range(values, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="tiny,B/2")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{STEPS} steps dpm++ with CFG {GUIDANCE}, {args.precision}, median of {args.repeats} (min–max), seconds per image\n")
    print("| model | size | parameters | diffusers s | pixforge s | diffusers / ours (median) | (min) | max abs Δ |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        overrides, side = MODELS[name]
        with tempfile.TemporaryDirectory() as folder:
            reference = build_diffusers_pipeline("alpha", "dpm++", **overrides)
            reference.save_pretrained(folder)
            ours = PixArtPipeline.from_pretrained(folder)
        if args.precision == "bf16":
            reference.to(torch.bfloat16)
            ours.set_precision("bf16")

        def run_reference():
            return reference(PROMPT, negative_prompt=NEGATIVE, height=side, width=side, num_inference_steps=STEPS,
                             guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED),
                             use_resolution_binning=False, clean_caption=False,
                             max_sequence_length=MAX_LENGTH).images[0]

        def run_ours():
            return ours(PROMPT, negative_prompt=NEGATIVE, height=side, width=side, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, seed=SEED, progress=False, max_sequence_length=MAX_LENGTH).images[0]

        difference = np.abs(np.asarray(run_reference(), dtype=np.float32) - np.asarray(run_ours(), dtype=np.float32))
        theirs, mine = timed_pair(run_reference, run_ours, args.repeats)
        parameters = sum(p.numel() for p in reference.transformer.parameters())
        print(f"| {name} | {side}² | {parameters / 1e6:.2f}M | {fmt(theirs)} | {fmt(mine)} | "
              f"{statistics.median(theirs) / statistics.median(mine):.2f}x | {min(theirs) / min(mine):.2f}x | "
              f"{difference.max() / 255:.4f} |", flush=True)


if __name__ == "__main__":
    main()
