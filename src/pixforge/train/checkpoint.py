"""Training checkpoints: atomic, keep-last-K, exact resume, refused when the run differs.

A checkpoint is a folder `checkpoints/step-00001200/` written as `.tmp-step-00001200/`
and renamed when complete, so a write killed half-way never replaces a good checkpoint.
Tensors go to safetensors; the optimizer state through `torch.save` and back with
`torch.load(weights_only=True)`; RNG states and the data position to JSON.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from pixforge.errors import CheckpointError

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    optimizer_state: dict,
    state: dict,
    keep_last: int,
) -> Path:
    """tensors: {"model": state_dict, "ema": state_dict, "rng": {...}} -> one file each."""
    from safetensors.torch import save_file

    folder = checkpoint_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, tensor_dict in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensor_dict.items()}, str(tmp / f"{name}.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for path in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
        tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure here means an unusable checkpoint
        raise CheckpointError(f"cannot read training checkpoint {path}: {error}") from error
    return tensors, optimizer, state
