"""`pixforge train --plot RUN`: loss, learning rate and throughput curves from metrics.csv."""
from __future__ import annotations

import csv
from pathlib import Path

from pixforge.errors import PixforgeError


def read_metrics(run_dir: str | Path) -> dict[str, list[float]]:
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise PixforgeError(f"{path} not found: is {run_dir} a training run folder?")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise PixforgeError(f"{path} has no rows yet")
    return {key: [float(row[key]) for row in rows] for key in rows[0]}


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = metrics["step"]
    axes[0].plot(steps, metrics["loss"], lw=1)
    axes[0].set_yscale("log")
    axes[0].set_title("loss")
    axes[1].plot(steps, metrics["lr"], lw=1)
    axes[1].set_title("learning rate")
    axes[2].plot(steps, metrics["samples_per_s"], lw=1)
    axes[2].set_title("samples / s")
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.suptitle(str(run_dir))
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")  # savefig infers the format from the suffix
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(out)
    return out
