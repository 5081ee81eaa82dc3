"""Timing helpers for the benchmarks: interleaved repeats (background load hits every
contender alike), median with min–max."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them in turn `repeats` times after warm-up."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def timed_pair(baseline: Callable[[], object], ours: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    times = interleaved({"baseline": baseline, "ours": ours}, repeats)
    return times["baseline"], times["ours"]


def median_range(values: list[float], digits: int = 3) -> str:
    """'median (min–max)'."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def shapes_items(n: int, split: str = "validation") -> list:
    """The benchmarks' prompts: shapes-world samples 0..n-1 of `split`, every third caption
    paraphrased (validation = what ECAD calibrates on; test = held aside for reporting)."""
    from pixforge.shapes.world import WorldConfig, sample

    plain, paraphrased = WorldConfig(), WorldConfig(paraphrase=True)
    return [sample(i, split, paraphrased if i % 3 == 2 else plain) for i in range(n)]


def evaluation_items(first: int, last: int, split: str = "test", paraphrased: float = 0.33) -> list:
    """Shapes-world samples first..last-1 of `split` as the default model's evaluation draws them
    (benchmarks/t2i_progress.py, the layout benchmarks): sample i paraphrased when
    (i·0.618… mod 1) < `paraphrased`, the training data's rule (a third, spread evenly, at 0.33)."""
    from pixforge.shapes.world import WorldConfig, sample

    plain, para = WorldConfig(), WorldConfig(paraphrase=True)
    return [sample(i, split, para if (i * 0.6180339887498949) % 1.0 < paraphrased else plain)
            for i in range(first, last)]


def paired_delta(ours: list[int], base: list[int]) -> str:
    """Two arms' pass/fail verdicts on the same prompts and seeds → '+2.3 ± 1.8 (lost 21,
    gained 30; n=395)': the mean paired difference in points ± its standard error."""
    d = [a - b for a, b in zip(ours, base, strict=True)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else 0.0
    return f"{100 * mean:+.1f} ± {100 * se:.1f} (lost {d.count(-1)}, gained {d.count(1)}; n={n})"


def stored_no_cache_verdicts(path, prompts: int, steps: int, split: str, first_prompt: int) -> list[int]:
    """The no-cache pass/fail verdicts stored by an earlier benchmark run (benchmarks/cache.py: a
    row whose "policy" is "none"; benchmarks/cache_ablate.py: "variant") on exactly these prompts,
    so a new run can pair with them instead of scoring no cache again. A run on the first N of the
    stored prompts takes their first N verdicts (image i's seed is its index either way)."""
    import json
    from pathlib import Path

    data = json.loads(Path(path).read_text())
    none = next((r for r in data.get("rows", []) if r.get("policy", r.get("variant")) == "none"), None)
    same = (data.get("steps"), data.get("split", "test"), data.get("first_prompt", 0)) == (steps, split, first_prompt)
    if none is None or not same or len(none["passed"]) < prompts:
        raise SystemExit(f"{path}: needs a 'none' row scored on {split} prompts "
                         f"{first_prompt}..{first_prompt + prompts - 1} at {steps} steps")
    return [int(c) for c in none["passed"][:prompts]]


def checker_passes(pipe, items, steps: int, cache=None, batch: int = 25, on_result=None,
                   checker=None, layout=None) -> list[int]:
    """The shapes checker's verdict (1 pass, 0 fail) on one generation per item (`items`:
    shapes-world samples), in chunks of `batch` prompts seeded with the index of their first
    item, so every policy or schedule compared sees the same prompts and seeds. `on_result`,
    if given, sees each chunk's pipeline result (e.g. to count the MACs an adaptive cache spent).
    `checker`: a CheckPool (checking in worker processes while the next chunk generates).
    `layout`: the pipeline's `layout` for every chunk, or a list with one entry per item."""
    from pixforge.eval.shapes import CheckPool

    checker = checker or CheckPool(0)
    pending = []
    for first in range(0, len(items), batch):
        chunk = items[first:first + batch]
        chunk_layout = layout[first:first + batch] if isinstance(layout, list) else layout
        out = pipe([item.caption for item in chunk], num_inference_steps=steps, seed=first, progress=False,
                   cache=cache, layout=chunk_layout)
        if on_result is not None:
            on_result(out)
        pending.append(checker.submit(out.images, [item.caption for item in chunk]))
    return [int(verdict) for verdicts in pending for verdict in verdicts()]


BENCHMARKS_ENV = "PIXFORGE_BENCHMARKS"


def benchmarks_dir():
    """The benchmark scripts' folder: $PIXFORGE_BENCHMARKS, else `benchmarks/` of the source
    checkout this package runs from (an editable install); a wheel does not ship them."""
    import os
    from pathlib import Path

    from pixforge.errors import PixforgeError

    given = os.environ.get(BENCHMARKS_ENV)
    folder = Path(given) if given else Path(__file__).resolve().parents[3] / "benchmarks"
    if not folder.is_dir():
        raise PixforgeError(
            f"no benchmarks folder at {folder}: the benchmarks live in the source checkout (git clone, then "
            f"pip install -e .), or set {BENCHMARKS_ENV}=DIR to the folder")
    return folder


def list_benchmarks(folder) -> dict[str, str]:
    """name -> the first line of its docstring, for every script in the folder (a .py file with a
    `__main__` block; helpers it imports are not listed)."""
    import ast
    import re

    out = {}
    for path in sorted(folder.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if path.name.startswith("_") or not re.search(r"__name__\s*==\s*[\"']__main__[\"']", text):
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        out[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def run_benchmark(folder, name: str, args: list[str]) -> None:
    """Run benchmarks/NAME.py in this process with `args` as its command line (its own argparse
    reads them; its SystemExit is the caller's)."""
    import runpy
    import sys

    from pixforge.errors import PixforgeError

    scripts = list_benchmarks(folder)
    if name not in scripts:
        raise PixforgeError(f"unknown benchmark {name!r}; choose one of {', '.join(scripts)}")
    script = folder / f"{name}.py"
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(folder))  # scripts import their neighbours (position_probe, ...)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path

