"""`pixforge eval`: score images against their captions in the shapes world, per category.

Inputs are an image folder with `metadata.jsonl` (imagefolder convention; records may hold
the scene, a GenEval `include` list, or only the caption text) or a model plus a prompt file,
whose images are generated first. Output: a table, a JSON report, optionally a bar chart.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from pixforge.errors import PixforgeError
from pixforge.shapes.export import METADATA, read_jsonl, record_spec
from pixforge.shapes.world import CATEGORIES


def score(items: list[tuple[Image.Image, dict]]) -> dict:
    """[(image, record)] → {"overall", "categories", "samples"}; a record names its caption
    (`text` or `prompt`) and optionally its category, scene or GenEval include list."""
    from pixforge.eval.shapes import check

    samples, totals = [], {}
    for image, record in items:
        spec, category = record_spec(record)
        result = check(image, spec)
        passed, total = totals.get(category, (0, 0))
        totals[category] = (passed + int(result.passed), total + 1)
        samples.append({
            "file_name": record.get("file_name"),
            "text": record.get("text", record.get("prompt")),
            "category": category,
            "passed": result.passed,
            "reason": result.reason,
            "found": [obj.to_json() for obj in result.found],
            "background": result.background,
        })
    order = [c for c in CATEGORIES if c in totals] + sorted(c for c in totals if c not in CATEGORIES)
    categories = {c: {"passed": totals[c][0], "total": totals[c][1], "accuracy": totals[c][0] / totals[c][1]}
                  for c in order}
    passed = sum(v["passed"] for v in categories.values())
    total = sum(v["total"] for v in categories.values())
    overall = {"passed": passed, "total": total, "accuracy": passed / total if total else 0.0}
    # GenEval's headline number: the mean over categories, so no category dominates by its size.
    overall["category_mean"] = sum(v["accuracy"] for v in categories.values()) / max(len(categories), 1)
    return {"overall": overall, "categories": categories, "samples": samples}


def score_folder(directory: str | Path, limit: int | None = None) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise PixforgeError(f"--images {directory} is not a folder")
    records = read_jsonl(directory / METADATA)
    if not records:
        raise PixforgeError(f"{directory / METADATA} has no records")
    records = records[:limit] if limit else records
    items = []
    for record in records:
        if "file_name" not in record:
            raise PixforgeError(f"a record of {directory / METADATA} has no 'file_name': {record}")
        path = directory / record["file_name"]
        if not path.is_file():
            raise PixforgeError(f"{path} is named in {METADATA} but does not exist")
        items.append((Image.open(path).convert("RGB"), record))
    return score(items)


def generate_and_score(
    model: str | Path, prompts: str | Path, seed: int = 0, height: int = 128, width: int = 128,
    save_images: str | Path | None = None, limit: int | None = None,
) -> dict:
    """Generate one image per prompt record (seed + line index), then score them."""
    from pixforge.sampling.pipeline import PixArtPipeline

    records = read_jsonl(prompts)
    records = records[:limit] if limit else records
    pipe = PixArtPipeline.from_pretrained(str(model))
    out = Path(save_images) if save_images else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    items = []
    for index, record in enumerate(records):
        prompt = record.get("prompt", record.get("text"))
        if prompt is None:
            raise PixforgeError(f"line {index + 1} of {prompts} has no 'prompt'")
        h, w = int(record.get("height", height)), int(record.get("width", width))
        image = pipe(prompt, seed=seed + index, height=h, width=w).images[0]
        record = dict(record, file_name=f"{index:06d}.png", text=prompt)
        if out is not None:
            image.save(out / record["file_name"])
        items.append((image, record))
    if out is not None:
        with open(out / METADATA, "w") as handle:
            for _, record in items:
                handle.write(json.dumps(record) + "\n")
    return score(items)


def format_table(results: dict) -> str:
    lines = [f"{'category':<14} {'passed':>7} {'total':>6} {'accuracy':>9}"]
    for name, row in results["categories"].items():
        lines.append(f"{name:<14} {row['passed']:>7} {row['total']:>6} {100 * row['accuracy']:>8.1f}%")
    overall = results["overall"]
    lines.append(f"{'overall':<14} {overall['passed']:>7} {overall['total']:>6} {100 * overall['accuracy']:>8.1f}%")
    lines.append(f"{'category mean':<14} {'':>7} {'':>6} {100 * overall['category_mean']:>8.1f}%")
    return "\n".join(lines)


def save_plot(results: dict, path: str | Path, title: str = "compositional accuracy") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["categories"]) + ["overall"]
    values = [100 * results["categories"][n]["accuracy"] for n in names[:-1]] + [100 * results["overall"]["accuracy"]]
    figure, axes = plt.subplots(figsize=(7, 3.5))
    bars = axes.bar(names, values, color=["#2563eb"] * (len(names) - 1) + ["#16a34a"])
    axes.bar_label(bars, fmt="%.1f")
    axes.set_ylim(0, 105)
    axes.set_ylabel("passed (%)")
    axes.set_title(title)
    axes.tick_params(axis="x", rotation=20)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
