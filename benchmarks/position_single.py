"""Position captions: `layout="auto"` as shipped against the same layout with each object's box
prompted "a single ..." (as the counting boxes are), same captions and seeds, paired.

    python benchmarks/position_single.py 4800 6000   # validation samples [first, last)

Writes benchmarks/results/position_single_{first}.json. A lead, not shipped (docs/generation.md).
"""
import json
import re
import sys
import time

import numpy as np
import torch

from pixforge.eval.bench import checker_passes, evaluation_items, paired_delta
from pixforge.sampling.pipeline import load_pipeline
from pixforge.sampling.regions import Layout, Region, auto_layout


def single(layout: Layout) -> Layout:
    """The layout with its two object boxes prompted "a single ..." ("one"/"a single" kept)."""
    regions = []
    for k, region in enumerate(layout.regions):
        prompt = region.prompt
        if k < 2 and not re.match(r"^(?:a\s+single|one|single)\s", prompt, re.I):
            prompt = re.sub(r"^(?:a|an)\s+", "a single ", prompt, flags=re.I) if re.match(r"^(?:a|an)\s", prompt, re.I) \
                else "a single " + prompt
        regions.append(Region(prompt, region.box))
    return Layout(tuple(regions), layout.fraction)


def main() -> None:
    first, last = int(sys.argv[1]), int(sys.argv[2])
    torch.set_grad_enabled(False)
    pipe = load_pipeline()
    pos = [item for item in evaluation_items(first, last, "validation") if item.scene.category == "position"]
    print(len(pos), "position captions", flush=True)
    shipped = [auto_layout(item.caption, background=pipe.layout_background) for item in pos]
    res = {}
    for arm, layouts in (("auto", shipped), ("single", [single(layout) for layout in shipped])):
        start = time.time()
        res[arm] = checker_passes(pipe, pos, 20, batch=16, layout=layouts)
        print(arm, f"{100 * np.mean(res[arm]):.1f}%", f"{time.time() - start:.0f}s", flush=True)
    print(f"single - auto: {paired_delta(res['single'], res['auto'])}", flush=True)
    with open(f"benchmarks/results/position_single_{first}.json", "w") as handle:
        json.dump({"first": first, "last": last, "passed": res, "captions": [item.caption for item in pos]}, handle)


if __name__ == "__main__":
    main()
