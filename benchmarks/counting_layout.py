"""Counting captions with regional boxes, one per counted object: arms on the same captions and
seeds, paired against plain sampling (docs/generation.md, "Counting: one box per object").

    python benchmarks/counting_layout.py --first 800 --last 2400 --min-count 3 \
        --arms plain,grid:0.0625,grid:0.0625:0.6:a_single,grid:0.1,grid:0.0625:0.7 --out out.json
    python benchmarks/counting_layout.py --first 2400 --last 4800 --min-count 3 --arms plain,auto --out out.json

Counting captions among samples [first, last) of the split (a third paraphrased, as the model's
evaluation; only counts >= --min-count), batches of 16 seeded by their first caption's ordinal,
20 dpm++ steps, the model's CFG. Arms: `plain`; `auto` (the product: `layout="auto"` with the
model's layout_background); `grid:INSET[:FRACTION[:FORM]]` (this script's boxes: a row of N
boxes for 2-3 objects in the middle band of the height, quadrants for 4, INSET of background
on each side of a shared edge, each box "FORM {colour} {shape}" + the canonical background
phrase; FORM "a" or "a_single"). The shipped geometry equals `grid:0.0625:0.6:a_single`; its
prompts differ only for paraphrased captions (the product makes the caption's own phrase
singular: "a single square that is blue").
"""
import argparse
import json
import time

import numpy as np
import torch

from pixforge.eval.bench import checker_passes, evaluation_items, paired_delta
from pixforge.sampling.pipeline import load_pipeline
from pixforge.sampling.regions import BAND as B, Layout, Region
from pixforge.shapes.world import article, parse_caption

def boxes_for(n, inset):
    g = inset
    if n == 2:
        return [(0.0, B, 0.5 - g, 1 - B), (0.5 + g, B, 1.0, 1 - B)]
    if n == 3:
        return [(0.0, B, 1/3 - g, 1 - B), (1/3 + g, B, 2/3 - g, 1 - B), (2/3 + g, B, 1.0, 1 - B)]
    return [(0.0, 0.0, 0.5 - g, 0.5 - g), (0.5 + g, 0.0, 1.0, 0.5 - g), (0.0, 0.5 + g, 0.5 - g, 1.0), (0.5 + g, 0.5 + g, 1.0, 1.0)]


def bg_bands(n):
    bands = []
    if n in (2, 3):
        bands += [(0.0, 0.0, 1.0, B), (0.0, 1 - B, 1.0, 1.0)]
    return bands


def layout_for(caption, filler, inset, frac=0.6, form="a"):
    spec = parse_caption(caption)
    g = spec.groups[0]
    ctx = f" on {article(spec.background)} {spec.background} background" if spec.background else ""
    fill = (f"{article(spec.background)} {spec.background} background") if spec.background else filler
    one = (f"{article(g.color)} {g.color} {g.shape}" if form == "a" else f"{form} {g.color} {g.shape}") + ctx
    regions = [Region(one, b) for b in boxes_for(g.count, inset)]
    regions += [Region(fill, b) for b in bg_bands(g.count)]
    if inset > 0:  # gaps between boxes: cover them with thin background strips
        if g.count == 2:
            regions.append(Region(fill, (0.5 - inset, B, 0.5 + inset, 1 - B)))
        elif g.count == 3:
            regions += [Region(fill, (1/3 - inset, B, 1/3 + inset, 1 - B)), Region(fill, (2/3 - inset, B, 2/3 + inset, 1 - B))]
        else:
            regions += [Region(fill, (0.5 - inset, 0.0, 0.5 + inset, 1.0)), Region(fill, (0.0, 0.5 - inset, 1.0, 0.5 + inset))]
    return Layout(tuple(regions), frac)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--last", type=int, default=800)
    parser.add_argument("--min-count", type=int, default=2)
    parser.add_argument("--arms", default="plain,auto", help="comma-separated: plain | auto | grid:INSET[:FRACTION[:FORM]]")
    parser.add_argument("--out", default="benchmarks/results/counting_layout.json")
    args = parser.parse_args()
    split, first, last, arms, out = args.split, args.first, args.last, args.arms.split(","), args.out
    torch.set_grad_enabled(False)
    pipe = load_pipeline()
    cnt = [it for it in evaluation_items(first, last, split)
           if it.scene.category == "counting" and len(it.scene.objects) >= args.min_count]
    print(len(cnt), "counting captions", flush=True)
    res = {}
    for arm in arms:
        t0 = time.time()
        if arm == "plain":
            layouts = None
        elif arm == "auto":
            layouts = "auto"
        else:
            parts = arm.split(":")
            inset = float(parts[1]) if len(parts) > 1 else 0.0
            frac = float(parts[2]) if len(parts) > 2 else 0.6
            form = parts[3].replace("_", " ") if len(parts) > 3 else "a"
            layouts = [layout_for(it.caption, pipe.layout_background, inset, frac, form) for it in cnt]
        res[arm] = passed = checker_passes(pipe, cnt, 20, batch=16, layout=layouts)
        by = {n: [p for p, it in zip(passed, cnt) if len(it.scene.objects) == n] for n in (2, 3, 4)}
        by = {n: round(100 * float(np.mean(v)), 1) for n, v in by.items() if v}
        print(arm, f"{100*np.mean(passed):.1f}%", by, f"{time.time()-t0:.0f}s", flush=True)
    for arm in arms[1:]:
        print(f"{arm} - {arms[0]}: {paired_delta(res[arm], res[arms[0]])}", flush=True)
    json.dump({"split": split, "first": first, "last": last, "passed": res,
               "counts": [len(it.scene.objects) for it in cnt], "captions": [it.caption for it in cnt]}, open(out, "w"))


if __name__ == "__main__":
    main()
