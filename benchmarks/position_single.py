"""Position captions: `layout="auto"` as shipped against the same layout with each object's box
prompted "a single ..." (as the counting boxes are), same captions and seeds, paired.

    python benchmarks/position_single.py 4800 6000   # validation samples [first, last)

Writes benchmarks/results/position_single_{first}.json. A lead, not shipped (docs/generation.md).
"""
import json, math, re, sys, time
import numpy as np, torch
from pixforge.eval.shapes import check
from pixforge.sampling.pipeline import load_pipeline
from pixforge.sampling.regions import auto_layout, Layout, Region
from pixforge.shapes.world import WorldConfig, sample
first, last = int(sys.argv[1]), int(sys.argv[2])
torch.set_grad_enabled(False)
pipe = load_pipeline()
bg = pipe.layout_background
plain, para = WorldConfig(), WorldConfig(paraphrase=True)
items = [sample(i, "validation", para if (i * 0.6180339887498949) % 1.0 < 0.33 else plain) for i in range(first, last)]
pos = [it for it in items if it.scene.category == "position"]
print(len(pos), "position captions", flush=True)
def single(layout):
    regs = []
    for k, r in enumerate(layout.regions):
        p = r.prompt
        if k < 2 and re.match(r"^(?:a\s+single|one|single)\s", p, re.I):
            pass
        elif k < 2:
            p = re.sub(r"^(?:a|an)\s+", "a single ", p, flags=re.I) if re.match(r"^(?:a|an)\s", p, re.I) else "a single " + p
        regs.append(Region(p, r.box))
    return Layout(tuple(regs), layout.fraction)
res = {}
for arm in ("auto", "single"):
    t0, passed = time.time(), []
    for f in range(0, len(pos), 16):
        chunk = pos[f:f+16]
        lays = [auto_layout(it.caption, background=bg) for it in chunk]
        if arm == "single":
            lays = [single(l) for l in lays]
        imgs = pipe([it.caption for it in chunk], seed=f, progress=False, layout=lays).images
        passed += [int(check(im, it.caption).passed) for im, it in zip(imgs, chunk)]
    res[arm] = passed
    print(arm, f"{100*np.mean(passed):.1f}%", f"{time.time()-t0:.0f}s", flush=True)
d = np.array(res["single"]) - np.array(res["auto"])
print(f"single - auto: {100*d.mean():+.1f} ± {100*d.std(ddof=1)/math.sqrt(len(d)):.1f} (lost {(d<0).sum()}, gained {(d>0).sum()}; n={len(d)})", flush=True)
json.dump({"first": first, "last": last, "passed": res, "captions": [it.caption for it in pos]}, open(f"benchmarks/results/position_single_{first}.json", "w"))
