"""Which steps need the unconditional CFG branch? CFG-cache patterns, delta reused or dropped.

    python benchmarks/cfg_cache_patterns.py --prompts 200       # the embedded default model

Every block computes at every step; only the unconditional branch of classifier-free guidance
is skipped at some steps. "reuse": a skipped step returns eps_c + (s - 1) * delta with the
guidance delta of the last step that ran both branches (pixforge's `cfg-cache`). "off": a
skipped step returns eps_c alone (guidance switched off there, the "guidance interval" idea).
Accuracy is the shapes checker on validation-split prompts (a third paraphrased), 20 dpm++
steps, the model's CFG; MACs relative to no cache (a skipped step runs half the batch).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pixforge.accel.cache import CacheRun, CfgCache
from pixforge.eval.bench import checker_passes, shapes_items
from pixforge.sampling.pipeline import load_pipeline


class _GuidanceOffRun(CacheRun):
    """A run whose reused guidance delta is zero: skipped steps use eps_cond alone."""

    def __setattr__(self, name, value):
        if name == "guidance_delta" and value is not None:
            value = torch.zeros_like(value)
        super().__setattr__(name, value)


@dataclass(frozen=True)
class Pattern(CfgCache):
    """The unconditional branch at the steps in `run` only."""

    label: str = ""
    run: tuple[int, ...] = (0,)
    off: bool = False

    @property
    def name(self) -> str:
        return self.label

    def mask(self, steps: int) -> np.ndarray:
        mask = np.zeros(steps, dtype=bool)
        mask[[s for s in self.run if s < steps]] = True
        return mask

    def start(self, steps: int, blocks: int) -> CacheRun:
        schedule = self.schedule(steps, blocks)
        return (_GuidanceOffRun if self.off else CacheRun)(schedule, steps, blocks, guidance=schedule.guidance)


def patterns(steps: int) -> dict[str, list[int] | None]:
    every = lambda n: list(range(0, steps, n))  # noqa: E731
    half = steps // 2
    return {
        "every step (no cache)": None, "every 2nd": every(2), "every 3rd": every(3), "every 4th": every(4),
        "first half only": list(range(half)), "0-5, then every 3rd": list(range(6)) + list(range(6, steps, 3)),
        "step 0 only": [0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--out", default="benchmarks/results/cfg_cache_patterns.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = load_pipeline(args.model)
    items = shapes_items(args.prompts, "validation")
    rows = []
    for mode in ("reuse", "off"):
        for name, run in patterns(args.steps).items():
            if run is None and mode == "off":
                continue
            policy = None if run is None else Pattern(label=f"{name} ({mode})", run=tuple(run), off=mode == "off")
            start = time.time()
            passes = checker_passes(pipe, items, args.steps, policy, args.batch)
            share = 1.0 if run is None else (args.steps + len(run)) / (2 * args.steps)  # of the blocks' MACs
            rows.append({"pattern": name, "mode": mode, "uncond_steps": run, "transformer_cost": share,
                         "accuracy": sum(passes) / len(items), "passes": "".join(map(str, passes))})
            print(f"{mode:6} {name:24} x{1 / share:4.2f}  {100 * sum(passes) / len(items):5.1f}%  "
                  f"({time.time() - start:.0f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"prompts": args.prompts, "split": "validation", "steps": args.steps,
                                          "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
