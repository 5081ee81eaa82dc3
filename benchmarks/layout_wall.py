"""Wall time of `layout="auto"` on the embedded model: one 128² image, 20 steps, a relation and a
counting prompt, each plain / with its layout / with the layout's shared-prompt regions kept in
separate rows (repeated prompts given trailing spaces: they encode alike but are not merged),
alternating in one process after a warm-up each; medians and per-round ratios.

    python benchmarks/layout_wall.py --repeats 7
"""
import argparse
import statistics
import time

import torch

from pixforge.sampling.pipeline import load_pipeline
from pixforge.sampling.regions import Layout, Region, auto_layout


def unmerged(layout: Layout) -> Layout:
    """The same boxes, each repeat of a prompt given one more trailing space (its own batch row)."""
    seen: dict[str, int] = {}
    regions = []
    for region in layout.regions:
        k = seen.get(region.prompt, 0)
        seen[region.prompt] = k + 1
        regions.append(Region(region.prompt + " " * k, region.box))
    return Layout(tuple(regions), layout.fraction)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = load_pipeline()
    rel, cnt = "a red circle to the left of a blue square", "three red circles"
    lr, lc = auto_layout(rel, background=pipe.layout_background), auto_layout(cnt, background=pipe.layout_background)
    arms = {"rel plain": (rel, None), "rel auto": (rel, lr), "rel unmerged": (rel, unmerged(lr)),
            "count plain": (cnt, None), "count auto": (cnt, lc), "count unmerged": (cnt, unmerged(lc))}
    for prompt, layout in arms.values():
        pipe(prompt, seed=0, progress=False, layout=layout)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for rep in range(args.repeats):
        for name, (prompt, layout) in arms.items():
            start = time.perf_counter()
            pipe(prompt, seed=rep, progress=False, layout=layout)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:16s} median {statistics.median(values):.3f} s  range {min(values):.3f}-{max(values):.3f}")
    for a, b in (("rel auto", "rel plain"), ("rel unmerged", "rel auto"), ("count auto", "count plain"),
                 ("count unmerged", "count auto")):
        ratios = [x / y for x, y in zip(times[a], times[b])]
        print(f"{a} / {b}: median {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
