"""Which reuse in a cache schedule costs the accuracy? Re-run one schedule with one kind of
reuse switched off at a time and score every variant on the same prompts and seeds.

    python benchmarks/cache_ablate.py benchmarks/results/ecad_v9_pareto.json --speedup 2.76 \
        --variants base,attn1,attn2,ff,guidance --prompts 600 --first-prompt 3000

Variants: `base` (the schedule as it is), `attn1` / `attn2` / `ff` (that component computed at
every step and block, the rest as scheduled), `guidance` (the unconditional branch at every
step: no CFG-cache), `none` (no cache, the reference every Δ is paired with; run first unless
--baseline gives its verdicts from an earlier run on the same prompts). Edits, joined by `&`:
`+attn1:1-5` computes self-attention in every block at steps 1..5, `-attn2:1-19` reuses
cross-attention there, `+ff:7/9/12` at single steps (`+attn1:1-5&-attn2:1-19`;
`CacheSchedule.edited`).
Prompts: validation split from --first-prompt (every third caption paraphrased, as the
benchmarks do), chunks of 25 seeded like `benchmarks/cache.py`. Per variant: MACs speed-up
(exact, `schedule_macs`), accuracy, paired Δ against no cache, and per category the prompts
it loses and gains (a schedule's loss can be systematic in one category and churn in others).
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import torch

from pixforge.accel.cache import COMPONENTS, CacheSchedule, schedule_macs
from pixforge.eval.bench import checker_passes, shapes_items, stored_no_cache_verdicts
from pixforge.sampling.pipeline import load_pipeline

VARIANTS = ("base", "attn1", "attn2", "ff", "guidance")


def load_schedule(path: str, speedup: float | None) -> CacheSchedule:
    """A schedule file, or the front point of a pareto.json nearest `speedup`."""
    data = json.loads(Path(path).read_text())
    if "front" not in data:
        return CacheSchedule.load(path)
    if speedup is None:
        raise SystemExit(f"{path} is a front: pass --speedup to pick a point")
    point = min(data["front"], key=lambda p: abs(p["speedup_macs"] - speedup))
    return CacheSchedule.from_dict(point["schedule"])


def variant(schedule: CacheSchedule, name: str) -> CacheSchedule | None:
    if name == "none":
        return None
    if name == "base":
        return schedule
    if name in (*COMPONENTS, "guidance"):  # computed (run) at every step
        return schedule.edited(f"+{name}:0-{schedule.steps - 1}")
    if ":" in name:  # edits of the base schedule
        return schedule.edited(name)
    raise SystemExit(f"unknown variant {name!r}; choose from none, {', '.join(VARIANTS)} or edits (+attn1:7-10)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("schedule", help="a schedule file, or a search's pareto.json (with --speedup)")
    parser.add_argument("--speedup", type=float, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--prompts", type=int, default=600)
    parser.add_argument("--first-prompt", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--baseline", default=None,
                        help="an earlier output of this script on the same prompts: reuse its no-cache verdicts")
    parser.add_argument("--out", default="benchmarks/results/cache_ablate.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = load_pipeline()
    schedule = load_schedule(args.schedule, args.speedup)
    items = shapes_items(args.first_prompt + args.prompts, "validation")[args.first_prompt:]
    categories = [item.scene.category for item in items]
    text_len = pipe.max_sequence_length
    batch = 2 if pipe.guidance_scale > 1 else 1

    stored_none = None
    if args.baseline:
        stored_none = stored_no_cache_verdicts(args.baseline, args.prompts, schedule.steps, "validation",
                                               args.first_prompt)
    rows, passed = [], {}
    for name in ["none", *[v for v in args.variants.split(",") if v and v != "none"]]:
        policy = variant(schedule, name)
        size = pipe.native_size
        speedup = 1.0 if policy is None else schedule_macs(pipe.transformer, policy, size, size, text_len, batch,
                                                           vae_scale_factor=pipe.vae_scale_factor)["ratio"]
        start = time.time()
        if name == "none" and stored_none is not None:
            verdicts = stored_none
        else:
            verdicts = checker_passes(pipe, items, schedule.steps, policy, args.batch)
        passed[name] = np.array(verdicts)
        d = passed[name] - passed["none"]
        per = collections.defaultdict(lambda: [0, 0])
        for c, x in zip(categories, d):
            per[c][0] += int(x < 0)
            per[c][1] += int(x > 0)
        row = {"variant": name, "speedup_macs": speedup, "accuracy": float(passed[name].mean()),
               "delta": float(d.mean()), "delta_se": float(d.std(ddof=1) / np.sqrt(len(d))),
               "lost_gained": {c: per[c] for c in sorted(per)}, "seconds": round(time.time() - start, 1),
               "passed": "".join(map(str, verdicts))}
        rows.append(row)
        flips = "  ".join(f"{c} -{lo}+{g}" for c, (lo, g) in row["lost_gained"].items() if lo or g)
        print(f"{name:<9} MACs x{speedup:4.2f}  accuracy {100 * row['accuracy']:5.1f}%  "
              f"Δ {100 * row['delta']:+5.1f} ± {100 * row['delta_se']:.1f}  ({row['seconds']:.0f} s)  {flips}",
              flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"schedule": args.schedule, "speedup": args.speedup,
                                              "split": "validation", "steps": schedule.steps,
                                              "first_prompt": args.first_prompt, "prompts": args.prompts,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
