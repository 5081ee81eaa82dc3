"""Validate the shapes-world checker (docs/evaluation.md).

For N test-split samples on the five canvas sizes, with paraphrased captions and some named
backgrounds: pass rate on clean renders, on each degradation, and rejection rate of
mismatched captions (same image, one attribute of the caption changed: colour, shape, count,
relation, background). One command:

    python benchmarks/shapes_checker.py --n 2000 --out benchmarks/results/shapes_checker.json
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np

from pixforge.eval.shapes import check
from pixforge.shapes import degrade as D
from pixforge.shapes.world import (
    BACKGROUNDS,
    CATEGORIES,
    COLORS,
    OPPOSITE_RELATION,
    RELATIONS,
    SHAPES,
    CaptionSpec,
    ObjectGroup,
    WorldConfig,
    canonical_caption,
    paraphrase,
    sample,
)

CANVASES = ((128, 128), (144, 112), (112, 144), (160, 96), (96, 160))
DEGRADATIONS = {
    "blur σ=1": lambda img, rng: D.gaussian_blur(img, 1.0),
    "noise σ=8": lambda img, rng: D.gaussian_noise(img, 8.0, rng),
    "jpeg q=35": lambda img, rng: D.jpeg(img, 35),
    "jitter": lambda img, rng: D.color_jitter(img, 0.1, 0.1, 0.15, 0.02, rng),
    "all four": lambda img, rng: D.degrade(img, 1.0, rng),
}


def mutations(spec: CaptionSpec, rng: np.random.Generator) -> dict[str, CaptionSpec]:
    """One wrong caption per attribute that can change for this spec."""
    groups = list(spec.groups)
    i = int(rng.integers(len(groups)))
    target = groups[i]
    out = {}

    def with_group(group: ObjectGroup) -> CaptionSpec:
        changed = groups.copy()
        changed[i] = group
        return replace(spec, groups=tuple(changed))

    others = [c for c in COLORS if c != target.color]
    out["colour"] = with_group(replace(target, color=others[rng.integers(len(others))]))
    others = [s for s in SHAPES if s != target.shape]
    out["shape"] = with_group(replace(target, shape=others[rng.integers(len(others))]))
    if spec.relation is None:  # a relation needs one object on each side
        counts = [n for n in (1, 2, 3, 4) if n != target.count and abs(n - target.count) <= 1]
        out["count"] = with_group(replace(target, count=int(counts[rng.integers(len(counts))])))
    else:
        others = [r for r in RELATIONS if r != spec.relation]
        out["relation"] = replace(spec, relation=others[rng.integers(len(others))])
    others = [b for b in BACKGROUNDS if b != spec.expected_background]
    out["background"] = replace(spec, background=others[rng.integers(len(others))])
    return out


def caption_for(spec: CaptionSpec, rng: np.random.Generator) -> str:
    return paraphrase(spec, rng) if rng.random() < 0.5 else canonical_caption(spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default=None, help="write the counts as JSON here")
    args = parser.parse_args()

    config = WorldConfig(canvas_sizes=CANVASES, paraphrase=True, background_prob=0.2)
    passed = defaultdict(lambda: defaultdict(int))  # condition → category → passes
    totals = defaultdict(lambda: defaultdict(int))
    failures = []
    start = time.perf_counter()
    for index in range(args.n):
        item = sample(index, args.split, config)
        category, image = item.scene.category, item.image
        rng = np.random.default_rng([7, index])

        def record(condition: str, ok: bool, reason: str, caption: str) -> None:
            totals[condition][category] += 1
            passed[condition][category] += int(ok)
            if not ok and len(failures) < 40:
                failures.append({"index": index, "condition": condition, "caption": caption, "reason": reason})

        result = check(image, item.caption)
        record("clean", result.passed, result.reason, item.caption)
        for name, damage in DEGRADATIONS.items():
            result = check(damage(image, rng), item.caption)
            record(name, result.passed, result.reason, item.caption)
        for kind, wrong in mutations(item.scene.spec(), rng).items():
            caption = caption_for(wrong, rng)
            result = check(image, caption)
            record(f"reject {kind}", not result.passed, "accepted", caption)
    seconds = time.perf_counter() - start

    conditions = ["clean", *DEGRADATIONS, "reject colour", "reject shape", "reject count",
                  "reject relation", "reject background"]
    header = f"| condition | {' | '.join(CATEGORIES)} | overall |"
    print(f"shapes checker, {args.n} {args.split} samples, {len(CANVASES)} canvas sizes, "
          f"paraphrased captions; {seconds:.0f} s ({1000 * seconds / args.n:.1f} ms/sample, all conditions)")
    print(header)
    print("|" + "---|" * (len(CATEGORIES) + 2))
    summary = {}
    for condition in conditions:
        cells = []
        for category in CATEGORIES:
            n = totals[condition][category]
            cells.append(f"{100 * passed[condition][category] / n:.1f}" if n else "–")
        n_all = sum(totals[condition].values())
        rate = sum(passed[condition].values()) / n_all
        summary[condition] = {"rate": rate, "n": n_all, "per_category": dict(passed[condition]),
                              "totals": dict(totals[condition])}
        print(f"| {condition} | {' | '.join(cells)} | {100 * rate:.2f} (n={n_all}) |")
    degraded = [c for c in DEGRADATIONS]
    degraded_rate = sum(summary[c]["rate"] * summary[c]["n"] for c in degraded) / sum(summary[c]["n"] for c in degraded)
    rejections = [c for c in conditions if c.startswith("reject")]
    reject_rate = sum(summary[c]["rate"] * summary[c]["n"] for c in rejections) / sum(summary[c]["n"] for c in rejections)
    print(f"clean pass {100 * summary['clean']['rate']:.2f}%  degraded pass {100 * degraded_rate:.2f}%  "
          f"mismatch rejection {100 * reject_rate:.2f}%")
    for failure in failures[:15]:
        print("  fail:", failure)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"n": args.n, "split": args.split, "seconds": seconds, "summary": summary,
                       "degraded_rate": degraded_rate, "reject_rate": reject_rate, "failures": failures},
                      handle, indent=1)


if __name__ == "__main__":
    main()
