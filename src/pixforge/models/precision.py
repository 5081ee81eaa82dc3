"""Precision selection: fp32, bf16, or "auto" = whichever runs GEMMs faster on this machine.

CPU types differ: on some x86 CPUs bf16 GEMMs run ~2x faster than fp32, on others ~2x
slower. "auto" measures both once (a GEMM shaped like a DiT MLP, ~0.5 s in all) and caches
the answer per CPU model, thread count and torch version in ~/.cache/pixforge.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from pixforge.errors import PixforgeError

PRECISIONS = ("auto", "fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_decided: dict[str, str] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("PIXFORGE_CACHE_DIR", Path.home() / ".cache" / "pixforge"))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gemm_rate(dtype: torch.dtype, m: int = 512, k: int = 1152, n: int = 4608, repeats: int = 5, device="cpu") -> float:
    """Best-of-`repeats` GFLOP/s of an (m x k) @ (k x n) product in `dtype`."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up (kernel selection, page faults)
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best / 1e9


def machine_key(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}|torch {torch.__version__}"
    return f"cpu:{_cpu_name()}|threads {torch.get_num_threads()}|torch {torch.__version__}"


def measure_precisions(device: str = "cpu") -> dict[str, float]:
    return {name: gemm_rate(dtype, device=device) for name, dtype in _DTYPES.items()}


def auto_precision(device: str = "cpu") -> str:
    """'fp32' or 'bf16', whichever is faster here; measured once per machine and cached."""
    device = str(device)
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    key = machine_key(device)
    if key in _decided:
        return _decided[key]
    path = cache_dir() / "precision.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    entry = table.get(key)
    if entry is None:
        rates = measure_precisions(device)
        entry = {"choice": max(rates, key=rates.get), "gflops": rates}
        table[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(table, indent=2))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home only costs a re-measurement next time
    _decided[key] = entry["choice"]
    return entry["choice"]


def resolve_device(device: str | torch.device) -> str:
    """A checked device name: `auto` -> `cuda` where a GPU is visible, else `cpu`; `cpu`, `cuda` and
    `cuda:N` are checked against this machine, so a missing GPU is one clear error rather than
    torch's from deep inside."""
    name = str(device).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise PixforgeError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise PixforgeError(f"device {device!r}: no CUDA GPU is visible here (torch {torch.__version__}, {built}); "
                            f"use cpu or auto")
    if index and int(index) >= torch.cuda.device_count():
        raise PixforgeError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"numbered from 0")
    return name


def resolve_dtype(precision: str, device: str = "cpu") -> torch.dtype:
    """Map "auto" | "fp32" | "bf16" to a torch dtype for this device."""
    if precision not in PRECISIONS:
        raise PixforgeError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = auto_precision(device)
    return _DTYPES[precision]
