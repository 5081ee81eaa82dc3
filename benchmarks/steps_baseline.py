"""No cache at fewer solver steps: the baseline every cache schedule must beat at equal MACs.

    python benchmarks/steps_baseline.py --prompts 1024 --first-prompt 3000 --steps 20,12,10,8 --precision bf16

Scores the embedded (or --model) pipeline with the shapes checker on validation prompts
first-prompt … first-prompt + prompts − 1 (the prompts `pixforge rescore-cache --first-prompt`
uses, so its Δs compare directly), once per step count, and prints each step count's accuracy
and its change against the first (largest) step count. MACs scale with the step count exactly
(every step runs the whole transformer on the same batch), so N steps save steps[0] / N.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pixforge.accel.ecad import shapes_quality
from pixforge.sampling.pipeline import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--first-prompt", type=int, default=1000)
    parser.add_argument("--steps", default="20,12,10,8")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", default="benchmarks/results/steps_baseline.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = load_pipeline(args.model, precision=args.precision)
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        start = time.time()
        accuracy = shapes_quality(pipe, n_prompts=args.prompts, steps=steps, seed=args.first_prompt)([None])[0]
        rows.append({"steps": steps, "accuracy": accuracy, "seconds": round(time.time() - start, 1)})
        base = rows[0]
        print(f"{steps:3d} steps  MACs x{base['steps'] / steps:4.2f}  accuracy {100 * accuracy:5.1f}%  "
              f"Δ {100 * (accuracy - base['accuracy']):+5.1f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": pipe.model_hash, "prompts": args.prompts,
                                          "first_prompt": args.first_prompt, "precision": args.precision,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
