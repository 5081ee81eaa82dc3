"""Which denoising steps can be reused? Whole-step reuse patterns at equal MACs.

    python benchmarks/cache_steps.py --prompts 200          # the embedded default model

Every schedule here computes or reuses whole steps (all blocks, all components): reuse every
other step only in the first or only in the second half; FORA; late-dense step sets (sparse
early, dense late: `late-dense:F`) against dense-early ones at the same MACs. Accuracy is the
shapes checker on validation-split prompts (a third paraphrased; the split ECAD calibrates
on, not the test split the cache benchmark reports), 20 dpm++ steps, the model's CFG.
Writes JSON (accuracy, MACs ratio, the computed steps of every schedule).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pixforge.accel.cache import CacheSchedule, LateDense, schedule_macs
from pixforge.eval.bench import checker_passes, shapes_items
from pixforge.sampling.pipeline import load_pipeline


def candidates(steps: int, blocks: int) -> list[CacheSchedule]:
    half = steps // 2
    whole_steps = CacheSchedule.whole_steps
    every = lambda start, stop, n: list(range(start, stop, n))  # noqa: E731
    out = [
        whole_steps(steps, blocks, range(steps), "none"),
        whole_steps(steps, blocks, every(0, steps, 2), "fora:2"),
        whole_steps(steps, blocks, [s for s in range(steps) if s >= half or s % 2 == 0], "reuse odd steps, first half"),
        whole_steps(steps, blocks, [s for s in range(steps) if s < half or s % 2 == 0], "reuse odd steps, second half"),
        whole_steps(steps, blocks, every(0, 12, 2) + every(12, steps, 4), "dense early (every 2nd to 12, then every 4th)"),
        whole_steps(steps, blocks, list(range(6)) + every(6, steps, 3), "dense early (0-5, then every 3rd)"),
        whole_steps(steps, blocks, [0, 3, 6, 9] + list(range(half, steps)), "every 3rd to 9, then all"),
        whole_steps(steps, blocks, [0, 5] + list(range(half, steps)), "0, 5, then all from 10"),
        whole_steps(steps, blocks, [0, 6] + list(range(12, steps)), "0, 6, then all from 12"),
    ]
    return out + [LateDense(fraction).schedule(steps, blocks) for fraction in (0.5, 0.45, 0.4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--out", default="benchmarks/results/cache_steps.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = load_pipeline(args.model)
    blocks = pipe.transformer.config.num_layers
    size = pipe.native_size
    batch = 2 if pipe.guidance_scale > 1 else 1
    items = shapes_items(args.prompts, "validation")
    rows = []
    for schedule in candidates(args.steps, blocks):
        speedup = schedule_macs(pipe.transformer, schedule, size, size, pipe.max_sequence_length, batch=batch,
                                vae_scale_factor=pipe.vae_scale_factor)["ratio"]  # no-cache MACs / these
        start = time.time()
        passed = sum(checker_passes(pipe, items, args.steps, schedule, args.batch))
        computed = [s for s in range(args.steps) if schedule.compute[s].all()]
        rows.append({"schedule": schedule.name, "macs_ratio": 1 / speedup, "speedup_macs": speedup,
                     "accuracy": passed / len(items), "computed_steps": computed, "seconds": round(time.time() - start, 1)})
        print(f"{schedule.name:<48} x{speedup:4.2f}  {100 * passed / len(items):5.1f}%  steps {computed}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"prompts": args.prompts, "split": "validation", "steps": args.steps,
                                          "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
