"""Fit TeaCache's rescaling polynomial on a model.

TeaCache decides to skip a step from how much block 0's timestep-modulated input changed
since the previous step (cheap: one LayerNorm + modulation), but what matters is how much
the blocks' output-minus-input (what a skipped step reuses) changed. This script records
both relative-L1 changes over full (uncached) generations and fits output-change as a
polynomial of input-change; `--write` stores the coefficients in the model folder's
model_index.json (`_pixforge.teacache_coefficients`), where `--cache teacache:T` finds them.

    python benchmarks/teacache_fit.py --model src/pixforge/assets/default --prompts 24 --write
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pixforge.accel.cache import rel_l1
from pixforge.models.transformer import modulate
from pixforge.sampling.pipeline import default_model_dir, load_pipeline
from pixforge.shapes.world import WorldConfig, sample


def record(pipe, prompts: list[str], steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per consecutive step pair: (rel change of block 0's modulated input, rel change of the residual)."""
    blocks = pipe.transformer.transformer_blocks
    trace: list[tuple[torch.Tensor, torch.Tensor]] = []
    current = {}

    def first_pre(module, args):
        x, t_mod = args[0], args[1]
        shift, scale = module.modulation(t_mod)[:2]
        current["signal"] = modulate(module.norm(x), shift, scale)
        current["input"] = x

    def last_post(module, args, output):
        trace.append((current["signal"], output - current["input"]))

    handles = [blocks[0].register_forward_pre_hook(first_pre), blocks[-1].register_forward_hook(last_post)]
    xs, ys = [], []
    try:
        for i, prompt in enumerate(prompts):
            trace.clear()
            pipe(prompt, num_inference_steps=steps, seed=seed + i, progress=False)
            for (s0, r0), (s1, r1) in zip(trace, trace[1:]):
                xs.append(rel_l1(s1, s0))
                ys.append(rel_l1(r1, r0))
    finally:
        for handle in handles:
            handle.remove()
    return np.array(xs), np.array(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--degree", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="store the coefficients in the model folder")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = load_pipeline(args.model)
    prompts = [sample(i, "validation", WorldConfig()).caption for i in range(args.prompts)]
    x, y = record(pipe, prompts, args.steps, seed=0)
    coefficients = np.polyfit(x, y, args.degree)
    fitted = np.polyval(coefficients, x)
    r2 = 1 - ((y - fitted) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    print(f"{len(x)} step pairs; input change {x.min():.4f}..{x.max():.4f}, residual change {y.min():.4f}..{y.max():.4f}")
    print(f"degree-{args.degree} fit R^2 = {r2:.3f}; coefficients (highest power first):")
    print(json.dumps([float(c) for c in coefficients]))
    if args.write:
        folder = Path(args.model) if args.model else default_model_dir()
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index.setdefault("_pixforge", {})["teacache_coefficients"] = [float(c) for c in coefficients]
        from pixforge.models.convert import atomic_write_bytes

        atomic_write_bytes(index_path, (json.dumps(index, indent=2) + "\n").encode())
        print(f"wrote the coefficients to {index_path}")


if __name__ == "__main__":
    main()
