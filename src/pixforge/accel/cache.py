"""Feature caching for DiT sampling: one schedule format, the policies that use it, exact MACs.

A generation runs the transformer once per sampling step. Every block has three components
(self-attention `attn1`, cross-attention `attn2`, feed-forward `ff`); a cache decides per
step x block x component whether to compute it or to reuse its output from the last step it
was computed. What is stored is the component's output *before* the adaLN gate (ECAD's
choice), so a reused output is still gated by the current timestep.

    run = parse_cache_spec("fora:3").start(steps=20, blocks=28)
    transformer(x, t, text_context=ctx, cache=run)   # once per step; run.step advances

Policies:
- `CacheSchedule`: a static (steps, blocks, 3) compute mask, on disk as JSON (ours or ECAD's
  published format). FORA and Δ-DiT compile to one; ECAD's search produces them.
- `ToCa`: token-wise; full refresh every N steps, in between self-attention is reused and
  cross-attention / MLP recompute only the top-scoring fraction of tokens.
- `TeaCache`: adaptive; accumulates the (polynomial-rescaled) relative change of block 0's
  timestep-modulated input and reuses every block's output-minus-input while it stays small.
- `FirstBlockCache`: computes block 0 every step; reuses the rest when block 0's residual
  barely changed.

`block_reuse="delta"` (Δ-DiT, TeaCache, first-block) reuses a whole block as its cached
deviation (output minus input); over a run of skipped blocks the deviations telescope to the
run's deviation, exactly Δ-Cache. `"gated"` (ECAD, FORA) reuses components one by one.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pixforge.errors import PixforgeError
from pixforge.models.transformer import modulate

COMPONENTS = ("attn1", "attn2", "ff")
BLOCK_REUSE = ("gated", "delta")
SCHEDULE_FORMAT = "pixforge-cache-schedule"


# ------------------------------------------------------------------------------------
# The schedule format
# ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CacheSchedule:
    """compute[s, b, c] is True where step s computes component c of block b.

    Step 0 must compute everything (nothing is cached yet). `block_reuse`: what a block with
    no component computed does — "gated": reuse each component's output under the current
    gates; "delta": add the block's cached output-minus-input.
    """

    compute: np.ndarray
    name: str = "custom"
    block_reuse: str = "gated"
    # guidance[s]: whether step s runs the unconditional CFG branch; where it does not, the
    # guidance delta (eps_cond - eps_uncond) of the last step that ran it is reused (CFG-cache).
    # None: every step runs it. Ignored by generations without classifier-free guidance.
    guidance: np.ndarray | None = None
    # Increment-calibrated reuse (ICC): 0 = a reused component returns its cached output; R > 0 =
    # it is recomputed cheaply as cached output + rank-R SVD factors of each of its linear layers
    # applied to that layer's input change since the cache, the nonlinearities (attention
    # softmax, GELU) run exactly. Costs ~R (in + out) MACs per token per linear layer.
    calibration_rank: int = 0
    # The model hash (PixArtPipeline.model_hash) of the weights a search found it on, if any: a
    # searched schedule's measured accuracy holds for those weights only.
    searched_on: str | None = None
    # The classifier-free guidance scale its accuracy was measured at (a search's --cfg): a
    # generation that names no scale uses it. None: the model's default applies.
    guidance_scale: float | None = None

    def __post_init__(self):
        compute = np.asarray(self.compute)
        if compute.ndim != 3 or compute.shape[2] != 3 or compute.shape[0] < 1 or compute.shape[1] < 1:
            raise PixforgeError(
                f"cache schedule {self.name!r} has shape {compute.shape}; expected (steps, blocks, 3) "
                f"with components {COMPONENTS}"
            )
        if compute.dtype != np.bool_:
            if not np.isin(compute, (0, 1)).all():
                raise PixforgeError(f"cache schedule {self.name!r} holds values other than true/false")
            compute = compute.astype(bool)
        if not compute[0].all():
            raise PixforgeError(
                f"cache schedule {self.name!r} reuses something at step 0; the first step must compute "
                f"every component (nothing is cached yet)"
            )
        if self.block_reuse not in BLOCK_REUSE:
            raise PixforgeError(f"block_reuse={self.block_reuse!r}; choose one of {BLOCK_REUSE}")
        object.__setattr__(self, "compute", compute)
        scale = self.guidance_scale
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not math.isfinite(scale) \
                    or scale < 0:
                raise PixforgeError(f"cache schedule {self.name!r}: guidance_scale={scale!r} must be a finite number >= 0")
            object.__setattr__(self, "guidance_scale", float(scale))
        rank = self.calibration_rank
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
            raise PixforgeError(f"cache schedule {self.name!r}: calibration_rank={rank!r} must be an int >= 0")
        object.__setattr__(self, "calibration_rank", int(rank))
        if rank and self.block_reuse != "gated":
            raise PixforgeError(f"cache schedule {self.name!r}: increment calibration (icc) needs component-wise "
                                f"(gated) reuse; block_reuse={self.block_reuse!r} reuses whole blocks")
        if self.guidance is not None:
            guidance = np.asarray(self.guidance)
            if guidance.shape != (compute.shape[0],) or not np.isin(guidance, (0, 1)).all():
                raise PixforgeError(
                    f"cache schedule {self.name!r}: guidance must be one true/false per step ({compute.shape[0]}), "
                    f"got shape {guidance.shape}"
                )
            guidance = guidance.astype(bool)
            if not guidance[0]:
                raise PixforgeError(
                    f"cache schedule {self.name!r} skips the unconditional branch at step 0; the first step must "
                    f"run it (there is no guidance delta to reuse yet)"
                )
            object.__setattr__(self, "guidance", None if guidance.all() else guidance)

    @property
    def steps(self) -> int:
        return self.compute.shape[0]

    @property
    def blocks(self) -> int:
        return self.compute.shape[1]

    @classmethod
    def all_compute(cls, steps: int, blocks: int) -> "CacheSchedule":
        return cls(np.ones((steps, blocks, 3), dtype=bool), name="none")

    @classmethod
    def whole_steps(cls, steps: int, blocks: int, computed, name: str = "custom") -> "CacheSchedule":
        """Every component of every block computed at the steps in `computed`, reused at the others."""
        compute = np.zeros((steps, blocks, 3), dtype=bool)
        compute[sorted(set(computed))] = True
        return cls(compute, name=name)

    @property
    def compute_fraction(self) -> float:
        return float(self.compute.mean())

    def __eq__(self, other) -> bool:
        return (isinstance(other, CacheSchedule) and self.block_reuse == other.block_reuse
                and self.calibration_rank == other.calibration_rank and np.array_equal(self.compute, other.compute)
                and np.array_equal(self.guidance_mask, other.guidance_mask))

    @property
    def guidance_mask(self) -> np.ndarray:
        """(steps,) bool: the steps that run the unconditional branch."""
        return np.ones(self.steps, dtype=bool) if self.guidance is None else self.guidance

    def with_guidance(self, guidance, name: str | None = None) -> "CacheSchedule":
        """This schedule with the unconditional branch run only at the steps where `guidance` is true."""
        return CacheSchedule(self.compute, name=self.name if name is None else name, block_reuse=self.block_reuse,
                             guidance=guidance, calibration_rank=self.calibration_rank)

    def with_calibration(self, rank: int, name: str | None = None) -> "CacheSchedule":
        """This schedule with its reused components increment-calibrated at `rank` (0: plain reuse)."""
        return CacheSchedule(self.compute, name=self.name if name is None else name, block_reuse=self.block_reuse,
                             guidance=self.guidance, calibration_rank=rank)

    def edited(self, edits: str, name: str | None = None) -> "CacheSchedule":
        """This schedule with whole components switched on or off at some steps, in every block:
        `+attn1:7-10/12` computes self-attention at steps 7..10 and 12, `-attn2:13/17` reuses
        cross-attention there, `+guidance:3` runs the unconditional branch at step 3; edits
        joined by `&` apply left to right. For targeted changes after an ablation shows which
        reuse costs accuracy (benchmarks/cache_ablate.py)."""
        compute, guidance = self.compute.copy(), self.guidance_mask.copy()
        for edit in (e.strip() for e in edits.split("&")):
            sign, what, steps = edit[:1], *edit[1:].partition(":")[::2]
            if sign not in ("+", "-") or what not in (*COMPONENTS, "guidance") or not steps:
                raise PixforgeError(f"schedule edit {edit!r}: expected +COMPONENT:STEPS or -COMPONENT:STEPS with "
                                    f"COMPONENT one of {', '.join(COMPONENTS)}, guidance (e.g. +attn1:7-10/12)")
            chosen = []
            for part in steps.split("/"):
                lo, _, hi = part.partition("-")
                try:
                    chosen += range(int(lo), int(hi or lo) + 1)
                except ValueError:
                    raise PixforgeError(f"schedule edit {edit!r}: steps are N, N-M or N/M/..., got {part!r}") from None
            if not chosen or min(chosen) < 0 or max(chosen) >= self.steps:
                raise PixforgeError(f"schedule edit {edit!r}: steps must lie in 0..{self.steps - 1}")
            if what == "guidance":
                guidance[chosen] = sign == "+"
            else:
                compute[chosen, :, COMPONENTS.index(what)] = sign == "+"
        return CacheSchedule(compute, name=name or f"{self.name}{edits}",
                             block_reuse=self.block_reuse, guidance=guidance, calibration_rank=self.calibration_rank)

    def start(self, steps: int, blocks: int) -> "CacheRun":
        if (steps, blocks) != (self.steps, self.blocks):
            raise PixforgeError(
                f"cache schedule {self.name!r} is for {self.steps} steps x {self.blocks} blocks; this "
                f"generation has {steps} steps x {blocks} blocks (use the schedule's step count, or a policy "
                f"such as fora:N that adapts)"
            )
        return CacheRun(self, steps, blocks, guidance=self.guidance, calibration_rank=self.calibration_rank)

    # --- JSON: ours ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {
            "format": SCHEDULE_FORMAT, "version": 1, "name": self.name, "block_reuse": self.block_reuse,
            "steps": self.steps, "blocks": self.blocks, "components": list(COMPONENTS),
            # one string per step: per block three 0/1 digits (attn1 attn2 ff), blocks space-separated
            "compute": [" ".join("".join("1" if c else "0" for c in block) for block in step) for step in self.compute],
        }
        if self.guidance is not None:  # one 0/1 digit per step: run the unconditional branch
            data["guidance"] = "".join("1" if g else "0" for g in self.guidance)
        if self.calibration_rank:
            data["calibration_rank"] = self.calibration_rank
        if self.searched_on:
            data["searched_on"] = self.searched_on
        if self.guidance_scale is not None:
            data["guidance_scale"] = self.guidance_scale
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "schedule") -> "CacheSchedule":
        if "cache_schedule" in data:
            return cls.from_ecad(data, source)
        if data.get("format") != SCHEDULE_FORMAT:
            raise PixforgeError(
                f"{source}: not a cache schedule (expected \"format\": \"{SCHEDULE_FORMAT}\", or ECAD's "
                f"{{\"cache_schedule\": ...}})"
            )
        try:
            rows = data["compute"]
            steps, blocks = int(data["steps"]), int(data["blocks"])
            compute = np.array([[[ch == "1" for ch in block] for block in row.split()] for row in rows], dtype=object)
            bad = [c for row in rows for c in row.replace(" ", "") if c not in "01"]
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PixforgeError(f"{source}: malformed cache schedule ({error!r})") from error
        if bad:
            raise PixforgeError(f"{source}: compute strings may hold only 0, 1 and spaces, found {bad[0]!r}")
        if len(rows) != steps or compute.ndim != 3 or compute.shape[1:] != (blocks, 3):
            raise PixforgeError(
                f"{source}: compute has shape {compute.shape if compute.ndim == 3 else (len(rows), '?')} but "
                f"the header says {steps} steps x {blocks} blocks x 3 components"
            )
        guidance = data.get("guidance")
        if guidance is not None:
            if not isinstance(guidance, str) or len(guidance) != steps or set(guidance) - {"0", "1"}:
                raise PixforgeError(f"{source}: guidance must be a string of {steps} 0/1 digits, one per step")
            guidance = np.array([g == "1" for g in guidance])
        rank = data.get("calibration_rank", 0)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise PixforgeError(f"{source}: calibration_rank must be an integer >= 0, got {rank!r}")
        searched_on = data.get("searched_on")
        if searched_on is not None and not isinstance(searched_on, str):
            raise PixforgeError(f"{source}: searched_on must be a model hash string, got {searched_on!r}")
        scale = data.get("guidance_scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise PixforgeError(f"{source}: guidance_scale must be a number, got {scale!r}")
        return cls(compute.astype(bool), name=str(data.get("name", "custom")),
                   block_reuse=str(data.get("block_reuse", "gated")), guidance=guidance, calibration_rank=rank,
                   searched_on=searched_on, guidance_scale=scale)

    # --- JSON: ECAD's published format --------------------------------------------------------
    def to_ecad(self) -> dict:
        """ECAD's file layout (`AniAggarwal/ecad` schedules): true = recompute."""
        if self.block_reuse != "gated":
            raise PixforgeError("ECAD's schedule format has no block-delta reuse; only gated schedules export")
        if self.guidance is not None:
            raise PixforgeError("ECAD's schedule format has no unconditional-branch reuse (guidance); save it in ours")
        if self.calibration_rank:
            raise PixforgeError("ECAD's schedule format has no increment calibration (icc); save it in ours")
        schedule = {
            f"{s:03d}": {str(b): {c: bool(self.compute[s, b, i]) for i, c in enumerate(COMPONENTS)}
                         for b in range(self.blocks)}
            for s in range(self.steps)
        }
        return {"cache_schedule": {"num_blocks": self.blocks, "num_inference_steps": self.steps,
                                   "name": self.name, "schedule": schedule}}

    @classmethod
    def from_ecad(cls, data: dict, source: str = "schedule") -> "CacheSchedule":
        try:
            body = data["cache_schedule"]
            steps, blocks = int(body["num_inference_steps"]), int(body["num_blocks"])
            table = body["schedule"]
            compute = np.ones((steps, blocks, 3), dtype=bool)
            seen = set()
            for step_key, step_value in table.items():
                s = int(step_key)
                for block_key, components in step_value.items():
                    b = int(block_key)
                    if not (0 <= s < steps and 0 <= b < blocks):
                        raise PixforgeError(f"{source}: step {s} / block {b} is outside {steps} steps x {blocks} blocks")
                    for i, name in enumerate(COMPONENTS):
                        value = components[name]
                        if not isinstance(value, bool):
                            raise PixforgeError(f"{source}: step {s} block {b} {name} must be true/false, got {value!r}")
                        compute[s, b, i] = value
                    seen.add((s, b))
        except PixforgeError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PixforgeError(f"{source}: malformed ECAD cache schedule (missing or bad {error!s})") from error
        if len(seen) != steps * blocks:
            raise PixforgeError(f"{source}: ECAD schedule lists {len(seen)} of {steps * blocks} step/block entries")
        return cls(compute, name=str(body.get("name", "ecad")))

    def save(self, path: str | Path, ecad: bool = False) -> Path:
        from pixforge.models.convert import atomic_write_bytes

        data = self.to_ecad() if ecad else self.to_dict()
        path = Path(path)
        atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CacheSchedule":
        path = Path(path)
        if not path.is_file():
            raise PixforgeError(f"cache schedule file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PixforgeError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(data, dict):
            raise PixforgeError(f"{path}: a cache schedule is a JSON object")
        return cls.from_dict(data, source=str(path))


# ------------------------------------------------------------------------------------
# Policies that compile to a schedule
# ------------------------------------------------------------------------------------
def _check_interval(policy: str, value) -> None:
    if not isinstance(value, int) or value < 1:
        raise PixforgeError(f"{policy} interval={value!r} must be an int >= 1")


def _check_non_negative(policy: str, name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise PixforgeError(f"{policy} {name}={value!r} must be a finite number >= 0")


@dataclass(frozen=True)
class Fora:
    """FORA: compute everything every `interval` steps, reuse every component in between."""

    interval: int = 3

    def __post_init__(self):
        _check_interval("fora", self.interval)

    @property
    def name(self) -> str:
        return f"fora:{self.interval}"

    def schedule(self, steps: int, blocks: int) -> CacheSchedule:
        return CacheSchedule.whole_steps(steps, blocks, range(0, steps, self.interval), self.name)

    def start(self, steps: int, blocks: int) -> "CacheRun":
        return CacheRun(self.schedule(steps, blocks), steps, blocks)


@dataclass(frozen=True)
class DeltaDiT:
    """Δ-DiT (Δ-Cache): every `interval` steps compute everything; in between skip `blocks`
    blocks and add back their cached deviation — the rear blocks before step `boundary`
    (the front blocks shape the outline early), the front blocks from it on (the rear
    blocks shape the details late). `boundary` < 1 is a fraction of the steps."""

    interval: int = 2
    boundary: float = 0.5
    blocks: int = 0  # 0: half of the model's blocks

    def __post_init__(self):
        _check_interval("delta-dit", self.interval)
        if not (isinstance(self.boundary, (int, float)) and self.boundary >= 0):
            raise PixforgeError(f"delta-dit boundary={self.boundary!r} must be >= 0 (a step, or a fraction < 1)")
        if not isinstance(self.blocks, int) or self.blocks < 0:
            raise PixforgeError(f"delta-dit blocks={self.blocks!r} must be an int >= 0")

    @property
    def name(self) -> str:
        return f"delta-dit:interval={self.interval},boundary={self.boundary:g},blocks={self.blocks}"

    def schedule(self, steps: int, blocks: int) -> CacheSchedule:
        skip = self.blocks or blocks // 2
        if skip > blocks:
            raise PixforgeError(f"delta-dit blocks={skip} but the model has {blocks} blocks")
        boundary = round(self.boundary * steps) if self.boundary < 1 else int(self.boundary)
        compute = np.ones((steps, blocks, 3), dtype=bool)
        for s in range(steps):
            if s % self.interval == 0:
                continue
            skipped = range(blocks - skip, blocks) if s < boundary else range(skip)
            compute[s, list(skipped)] = False
        name = f"delta-dit:interval={self.interval},boundary={self.boundary:g},blocks={skip}"
        return CacheSchedule(compute, name=name, block_reuse="delta")

    def start(self, steps: int, blocks: int) -> "CacheRun":
        return CacheRun(self.schedule(steps, blocks), steps, blocks)


def late_dense_steps(steps: int, count: int, gamma: float) -> list[int]:
    """`count` distinct step indices from 0 to steps - 1, sparse early and dense late: near
    (steps - 1) * (k / (count - 1)) ** gamma for k < count (gamma <= 1), a rounded index that
    collides with the next one moved down a step."""
    count = min(count, steps)
    if count < 2:
        return [0]
    chosen = [round((steps - 1) * (k / (count - 1)) ** gamma) for k in range(count)]
    for k in range(count - 2, -1, -1):
        chosen[k] = min(chosen[k], chosen[k + 1] - 1)
    return chosen


@dataclass(frozen=True)
class LateDense:
    """Whole steps computed sparse early and dense late (`fraction` of the steps, at
    `late_dense_steps`), every component reused in between; the first and last steps compute.

    Measured on the shapes model (2026-11-27, 200 validation prompts, no cache 61.5%):
    reusing every other step in the first half cost nothing (62.5%), in the second half
    6 points (55.5%). On a linear-in-t step grid the late, low-noise steps span most of
    the log-SNR range, so that is where computation pays."""

    fraction: float = 0.4
    gamma: float = 0.5

    def __post_init__(self):
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            raise PixforgeError(f"late-dense fraction={self.fraction!r} must be in (0, 1]: the share of steps computed")
        if not (isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1):
            raise PixforgeError(f"late-dense gamma={self.gamma!r} must be in (0, 1] (1 = evenly spaced)")

    @property
    def name(self) -> str:
        return f"late-dense:{self.fraction:g},gamma={self.gamma:g}"

    def schedule(self, steps: int, blocks: int) -> CacheSchedule:
        computed = late_dense_steps(steps, max(2, round(self.fraction * steps)), self.gamma)
        return CacheSchedule.whole_steps(steps, blocks, computed, self.name)

    def start(self, steps: int, blocks: int) -> "CacheRun":
        return CacheRun(self.schedule(steps, blocks), steps, blocks)


@dataclass(frozen=True)
class CfgCache:
    """CFG-cache: run the unconditional branch of classifier-free guidance only every
    `interval` steps (and at step 0); in between, run the conditional branch alone (half the
    batch) and reuse the guidance delta eps_cond - eps_uncond of the last step that ran both:
    eps = eps_cond + (scale - 1) * delta (FasterCache's CFG-cache without its frequency split).

    Alone (`cfg-cache:3`) every block still computes; `fora:2+cfg-cache:3` adds it to a
    block-level policy. Measured on the shapes model (2026-11-27, 200 validation prompts, no
    cache 61.5%): every 3rd step 60.5% at 1.48x MACs; skipping guidance instead of reusing
    its delta (guidance interval) 57.5% at the same cost."""

    interval: int = 3

    def __post_init__(self):
        _check_interval("cfg-cache", self.interval)

    @property
    def name(self) -> str:
        return f"cfg-cache:{self.interval}"

    def mask(self, steps: int) -> np.ndarray:
        return np.arange(steps) % self.interval == 0

    def schedule(self, steps: int, blocks: int) -> CacheSchedule:
        return CacheSchedule.all_compute(steps, blocks).with_guidance(self.mask(steps), name=self.name)

    def start(self, steps: int, blocks: int) -> "CacheRun":
        return self.schedule(steps, blocks).start(steps, blocks)


def static_schedule(policy, steps: int, blocks: int) -> CacheSchedule:
    """The static schedule a policy compiles to (a schedule is its own); online policies have none."""
    if isinstance(policy, CacheSchedule):
        return policy
    if not hasattr(policy, "schedule"):
        raise PixforgeError(f"{policy.name} decides online; it has no static schedule")
    return policy.schedule(steps, blocks)


@dataclass(frozen=True)
class WithCfgCache:
    """A block-level policy (`policy`) plus CFG-cache (`cfg`): `teacache:0.1+cfg-cache:3`."""

    policy: object
    cfg: CfgCache

    def __post_init__(self):
        if isinstance(self.policy, (CfgCache, WithCfgCache)) or (
                isinstance(self.policy, Icc) and isinstance(self.policy.policy, (CfgCache, WithCfgCache))):
            raise PixforgeError(f"cfg-cache is given twice ({self.policy.name} + {self.cfg.name})")
        if isinstance(self.policy, ToCa):
            raise PixforgeError(f"cfg-cache does not combine with {self.policy.name}: token-wise caching keeps per-row "
                                f"scores that a half-batch step would desynchronise")

    @property
    def name(self) -> str:
        return f"{self.policy.name}+{self.cfg.name}"

    def schedule(self, steps: int, blocks: int) -> CacheSchedule:
        base = static_schedule(self.policy, steps, blocks)
        return base.with_guidance(base.guidance_mask & self.cfg.mask(steps), name=self.name)

    def start(self, steps: int, blocks: int) -> "CacheRun":
        if isinstance(self.policy, (TeaCache, FirstBlockCache)):
            run = self.policy.start(steps, blocks)
            run.guidance = self.cfg.mask(steps)
            return run
        return self.schedule(steps, blocks).start(steps, blocks)


@dataclass(frozen=True)
class Icc:
    """Increment-calibrated caching (ICC, Chen et al., CVPR 2025) on top of a static policy:
    `fora:3+icc:16`. Where the policy reuses a component, it is recomputed as its cached output
    plus a rank-`rank` SVD approximation of each linear layer applied to that layer's input
    change since the cache; attention softmax and GELU run exactly on the calibrated values.
    Plain SVD of the weights (the paper's channel-aware variant weights it by activation
    statistics; not done here). Measured on the shapes model: see docs/acceleration.md."""

    policy: object
    rank: int = 16

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise PixforgeError(f"icc rank={self.rank!r} must be an int >= 1")
        if isinstance(self.policy, Icc):
            raise PixforgeError(f"icc is given twice ({self.policy.name} + icc:{self.rank})")
        if isinstance(self.policy, DeltaDiT) or not is_static(self.policy):  # Δ-DiT reuses whole blocks
            raise PixforgeError(f"icc calibrates component-wise reuse of a static schedule; it does not combine "
                                f"with {self.policy.name}")

    @property
    def name(self) -> str:
        return f"{self.policy.name}+icc:{self.rank}"

    def schedule(self, steps: int, blocks: int) -> CacheSchedule:
        return static_schedule(self.policy, steps, blocks).with_calibration(self.rank, name=self.name)

    def start(self, steps: int, blocks: int) -> "CacheRun":
        return self.schedule(steps, blocks).start(steps, blocks)


# ------------------------------------------------------------------------------------
# Online policies
# ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToCa:
    """Token-wise caching (ToCa). Every `interval` steps everything is computed; in between
    self-attention is reused and cross-attention / MLP recompute the top-scoring
    `ratio x factor` of the tokens (published PixArt defaults: interval 3, ratio 0.3,
    x0.6 cross-attention, x1.6 MLP), the rest keep their cached outputs.

    Scores, cheap by construction: cross-attention sharpness (1 - normalised entropy of the
    attention over text, measured at refresh steps where the probabilities are computed
    anyway), plus how many steps a token has gone stale, plus a bonus for the best token in
    each `window` x `window` cell so recomputed tokens spread over the image. ratio >= 1
    refreshes every token of every component: token caching off, equal to no cache.
    """

    interval: int = 3
    ratio: float = 0.3
    cross_factor: float = 0.6
    mlp_factor: float = 1.6
    staleness_weight: float = 0.5
    window: int = 2

    def __post_init__(self):
        _check_interval("toca", self.interval)
        for name in ("ratio", "cross_factor", "mlp_factor", "staleness_weight"):
            _check_non_negative("toca", name, getattr(self, name))
        if not isinstance(self.window, int) or self.window < 1:
            raise PixforgeError(f"toca window={self.window!r} must be an int >= 1")

    def fractions(self) -> dict[str, float]:
        if self.ratio >= 1:
            return {"attn1": 1.0, "attn2": 1.0, "ff": 1.0}
        return {"attn1": 0.0, "attn2": min(1.0, self.ratio * self.cross_factor), "ff": min(1.0, self.ratio * self.mlp_factor)}

    @property
    def name(self) -> str:
        return f"toca:interval={self.interval},ratio={self.ratio:g}"

    def start(self, steps: int, blocks: int) -> "CacheRun":
        return CacheRun(self, steps, blocks)


# TeaCache's rescaling polynomial (numpy.polyval order, highest power first). The identity
# until fitted: `benchmarks/teacache_fit.py` fits it on a model and writes teacache.json.
IDENTITY_POLY = (1.0, 0.0)


@dataclass(frozen=True)
class TeaCache:
    """Adaptive step skipping (TeaCache-style): accumulate poly(rel-L1 change of block 0's
    timestep-modulated input) since the last computed step; while the sum stays below
    `threshold`, reuse every block as its cached deviation. The first and last steps
    always compute."""

    threshold: float = 0.1
    coefficients: tuple[float, ...] = IDENTITY_POLY

    def __post_init__(self):
        _check_non_negative("teacache", "threshold", self.threshold)
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))

    @property
    def name(self) -> str:
        return f"teacache:{self.threshold:g}"

    def start(self, steps: int, blocks: int) -> "CacheRun":
        return CacheRun(self, steps, blocks)


@dataclass(frozen=True)
class FirstBlockCache:
    """First-block residual cache: block 0 runs every step; when its residual (output minus
    input) changed by less than `threshold` (relative L1) since the last full step, the other
    blocks are reused as their cached deviation."""

    threshold: float = 0.05

    def __post_init__(self):
        _check_non_negative("first-block", "threshold", self.threshold)

    @property
    def name(self) -> str:
        return f"first-block:{self.threshold:g}"

    def start(self, steps: int, blocks: int) -> "CacheRun":
        return CacheRun(self, steps, blocks)


# ------------------------------------------------------------------------------------
# Exact cost accounting (multiply-accumulates; FLOP counters report 2 per MAC)
# ------------------------------------------------------------------------------------
def component_linears(block, component: str) -> list:
    """The linear layers a component applies to every image token (cross-attention's text K/V
    projection runs once per generation and is not one of them)."""
    if component == "attn1":
        return [block.attn1.to_qkv, block.attn1.to_out]
    if component == "attn2":
        return [block.attn2.to_q, block.attn2.to_out]
    if component == "ff":
        return [block.ff.fc1, block.ff.fc2]
    raise KeyError(component)


def _attention_macs(block, component: str, queries: int, tokens: int, text_len: int) -> int:
    """A component's MACs outside its per-token linear layers (QK^T + AV; Σ's K/V conv)."""
    dim = block.attn1.to_out.in_features
    if component == "attn1":
        attn = block.attn1
        s = attn.kv_compress_scale
        keys = tokens // (s * s) if s > 1 else tokens
        macs = 2 * queries * keys * dim
        if s > 1 and attn.kv_compress_mode == "conv":
            macs += 2 * tokens * dim  # depthwise s x s stride-s conv over K and V
        return macs
    if component == "attn2":
        return 2 * queries * text_len * dim
    return 0


def component_macs(block, component: str, batch: int, queries: int, tokens: int, grid_hw, text_len: int) -> int:
    """MACs of one component of `block` for `queries` of the `tokens` image tokens."""
    linear = sum(layer.in_features * layer.out_features for layer in component_linears(block, component))
    return batch * (queries * linear + _attention_macs(block, component, queries, tokens, text_len))


def calibration_record_macs(block, component: str, batch: int, tokens: int, rank: int) -> int:
    """Extra MACs of a *computed* component under icc: each linear layer's input is also
    projected onto its rank-r right singular vectors (what a later calibration starts from;
    kept instead of the input itself, r values per token instead of `in`)."""
    return batch * tokens * sum(min(rank, layer.in_features, layer.out_features) * layer.in_features
                                for layer in component_linears(block, component))


def calibrated_macs(block, component: str, batch: int, tokens: int, text_len: int, rank: int) -> int:
    """MACs of an increment-calibrated reuse (icc) of a component: per linear layer
    min(rank, in, out) x (in + out) per token, the attention itself in full."""
    linear = sum(min(rank, layer.in_features, layer.out_features) * (layer.in_features + layer.out_features)
                 for layer in component_linears(block, component))
    return batch * (tokens * linear + _attention_macs(block, component, tokens, tokens, text_len))


def step_overhead_macs(transformer, batch: int, tokens: int) -> int:
    """MACs outside the blocks in one forward: patch embedding, timestep embedding, final layer."""
    c = transformer.config
    dim, patch = c.inner_dim, c.patch_size
    macs = tokens * c.in_channels * patch * patch * dim + tokens * dim * patch * patch * c.output_channels
    macs += 256 * dim + dim * dim + dim * 6 * dim  # timestep MLP + adaLN-single linear
    if c.uses_micro_conditions:
        macs += 3 * (256 * (dim // 3) + (dim // 3) ** 2)  # resolution (h, w) + aspect-ratio embedders
    return batch * macs


def text_macs(transformer, batch: int, text_len: int) -> int:
    """Once per generation: caption projection + every block's cross-attention K/V."""
    c = transformer.config
    dim = c.inner_dim
    macs = 0 if c.caption_channels is None else text_len * (c.caption_channels * dim + dim * dim)
    return batch * (macs + c.num_layers * text_len * 2 * dim * dim)


def batch_shares(guidance: np.ndarray) -> np.ndarray:
    """(steps,) share of the CFG-doubled batch each step runs: 1, or 0.5 where the step skips
    the unconditional branch (CFG-cache)."""
    return np.where(guidance, 1.0, 0.5)


def schedule_macs(transformer, schedule: CacheSchedule, height: int, width: int, text_len: int,
                  batch: int = 1, vae_scale_factor: int = 8) -> dict[str, float]:
    """MACs of a whole generation under a static schedule (batch = images x CFG branches)."""
    c = transformer.config
    grid = (height // vae_scale_factor // c.patch_size, width // vae_scale_factor // c.patch_size)
    tokens = grid[0] * grid[1]
    blocks = list(transformer.transformer_blocks)
    if schedule.blocks != len(blocks):
        raise PixforgeError(f"schedule has {schedule.blocks} blocks; the model has {len(blocks)}")
    per = np.array([[component_macs(b, comp, batch, tokens, tokens, grid, text_len) for comp in COMPONENTS]
                    for b in blocks], dtype=np.float64)  # (blocks, 3)
    mask = schedule.compute.copy()
    if schedule.block_reuse == "delta":  # a block computes all or nothing
        mask = np.repeat(mask.any(axis=2, keepdims=True), 3, axis=2)
    if schedule.guidance is not None and batch % 2:
        raise PixforgeError(f"schedule {schedule.name!r} reuses the unconditional branch; its MACs need the CFG "
                            f"batch (images x 2), got batch={batch}")
    share = batch_shares(schedule.guidance_mask)
    blocks_macs = float(((mask * per[None]).sum(axis=(1, 2)) * share).sum())
    if schedule.calibration_rank:  # every reused component is recomputed at low rank
        cal = np.array([[calibrated_macs(b, comp, batch, tokens, text_len, schedule.calibration_rank)
                         for comp in COMPONENTS] for b in blocks], dtype=np.float64)
        record = np.array([[calibration_record_macs(b, comp, batch, tokens, schedule.calibration_rank)
                            for comp in COMPONENTS] for b in blocks], dtype=np.float64)
        blocks_macs += float(((~mask * cal[None] + mask * record[None]).sum(axis=(1, 2)) * share).sum())
    full = float(per.sum()) * schedule.steps
    overhead = step_overhead_macs(transformer, batch, tokens)
    text = text_macs(transformer, batch, text_len)
    fixed_full = overhead * schedule.steps + text
    fixed = overhead * float(share.sum()) + text
    return {"total": blocks_macs + fixed, "no_cache": full + fixed_full,
            "ratio": (full + fixed_full) / (blocks_macs + fixed), "blocks": blocks_macs, "blocks_no_cache": full}


# ------------------------------------------------------------------------------------
# The runtime: one CacheRun per generation
# ------------------------------------------------------------------------------------
def lowrank_factors(layer: torch.nn.Linear, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B^T (in, r), A^T (r, out)) with weight ~ A @ B, the rank-r truncated SVD (r = min(rank,
    in, out)). The SVD runs once per layer and weight version (~15 ms for a 768 x 256 weight on a
    2-core CPU); every rank's factors are sliced from it and kept on the layer."""
    weight = layer.weight
    key = (weight.dtype, weight.device, weight.data_ptr(), weight._version)
    cached = layer.__dict__.get("_pixforge_svd")
    if cached is None or cached[0] != key:
        u, sv, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        cached = layer.__dict__["_pixforge_svd"] = (key, u * sv, vh, {})
    _, us, vh, by_rank = cached
    r = min(rank, vh.shape[0])
    if r not in by_rank:
        by_rank[r] = (vh[:r].T.to(weight.dtype).contiguous(), us[:, :r].T.to(weight.dtype).contiguous())
    return by_rank[r]


def rel_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean|new - old| / mean|old|: TeaCache's and first-block caching's change signal."""
    return float((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12))


@dataclass
class CacheRun:
    """State of one generation under a policy; `transformer(..., cache=run)` once per step.

    After the run: `computed` counts component evaluations, `macs` the block MACs spent
    (per component), `macs_full` what no cache would have spent, `decisions` the per-step
    choice of online policies.
    """

    policy: object
    steps: int
    blocks: int
    step: int = 0
    outputs: dict = field(default_factory=dict)      # (block, component) -> pre-gate output
    deltas: dict = field(default_factory=dict)       # block -> output minus input
    macs: dict = field(default_factory=lambda: {c: 0 for c in COMPONENTS})
    macs_full: int = 0
    decisions: list = field(default_factory=list)
    _accumulated: float = 0.0
    _adaptive: dict = field(default_factory=dict)    # "signal" (TeaCache) / "residual0" (first-block) -> last value
    _scores: dict = field(default_factory=dict)      # block -> (B, N) score from the last refresh
    _stale: dict = field(default_factory=dict)       # (block, component) -> (B, N) steps stale
    # CFG-cache: guidance[s] False = step s runs the conditional rows alone (`rows` is then
    # their slice of the cached tensors) and reuses `guidance_delta` (eps_cond - eps_uncond).
    guidance: np.ndarray | None = None
    rows: slice | None = None
    guidance_delta: torch.Tensor | None = None
    # icc: rank of the increment calibration of reused components (0: plain reuse); `inputs`
    # holds, per (block, component, name), what calibration starts from: the linear layers'
    # inputs projected to rank r (x @ V_r) and their outputs, at the component's last computation.
    calibration_rank: int = 0
    inputs: dict = field(default_factory=dict)

    def reuses_guidance(self) -> bool:
        """Whether the coming step skips the unconditional branch (see `pixforge.sampling.pipeline`)."""
        return self.guidance is not None and self.step < self.steps and not self.guidance[self.step]

    def _get(self, store: dict, key):
        """A cached tensor, restricted to the rows this step runs."""
        value = store.get(key)
        return value if value is None or self.rows is None else value[self.rows]

    def _put(self, store: dict, key, value: torch.Tensor) -> torch.Tensor:
        """Cache `value` for the rows this step runs (the others keep theirs)."""
        if self.rows is None:
            store[key] = value
        else:  # step 0 runs every row, so the full-batch entry exists
            store[key][self.rows] = value
        return value

    @property
    def macs_spent(self) -> int:
        return sum(self.macs.values())

    def run_blocks(self, blocks, x, t_mod, grid, text_context) -> torch.Tensor:
        if self.step >= self.steps:
            raise PixforgeError(f"cache run planned for {self.steps} steps was called a {self.step + 1}th time")
        policy = self.policy
        if self.rows is not None and isinstance(policy, ToCa):
            raise PixforgeError("toca does not combine with cfg-cache (a half-batch step)")
        self._count_full(blocks, x, grid, text_context)
        if isinstance(policy, CacheSchedule):
            x = self._run_schedule(blocks, x, t_mod, grid, text_context, policy)
        elif isinstance(policy, ToCa):
            x = self._run_toca(blocks, x, t_mod, grid, text_context, policy)
        elif isinstance(policy, (TeaCache, FirstBlockCache)):
            x = self._run_adaptive(blocks, x, t_mod, grid, text_context, policy)
        else:
            raise PixforgeError(f"unknown cache policy {policy!r}")
        self.step += 1
        return x

    # --- accounting ------------------------------------------------------------------------
    def _count(self, block, component, x, queries, grid, text_context) -> None:
        text_len = text_context.kv[0][0].shape[2]
        self.macs[component] += component_macs(block, component, x.shape[0], queries, x.shape[1], grid, text_len)

    def _count_full(self, blocks, x, grid, text_context) -> None:
        text_len = text_context.kv[0][0].shape[2]
        n = x.shape[1]
        batch = x.shape[0] * (2 if self.rows is not None else 1)  # no cache runs both CFG branches
        self.macs_full += sum(component_macs(b, c, batch, n, n, grid, text_len) for b in blocks for c in COMPONENTS)

    # --- one block, component-wise ---------------------------------------------------------
    def _block(self, index, block, x, t_mod, grid, k, v, bias, compute, text_context, keep_delta: bool):
        if self.calibration_rank:
            return self._block_calibrated(index, block, x, t_mod, grid, k, v, bias, compute, text_context)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(t_mod)
        x_in = x
        n = x.shape[1]
        if compute[0]:
            a1 = self._put(self.outputs, (index, "attn1"), block.self_attention(x, shift_msa, scale_msa, grid))
            self._count(block, "attn1", x, n, grid, text_context)
        else:
            a1 = self._cached(index, "attn1")
        x = torch.addcmul(x, gate_msa, a1)
        if compute[1]:
            a2 = self._put(self.outputs, (index, "attn2"), block.cross_attention(x, k, v, bias))
            self._count(block, "attn2", x, n, grid, text_context)
        else:
            a2 = self._cached(index, "attn2")
        x = x + a2
        if compute[2]:
            f = self._put(self.outputs, (index, "ff"), block.feed_forward(x, shift_mlp, scale_mlp))
            self._count(block, "ff", x, n, grid, text_context)
        else:
            f = self._cached(index, "ff")
        x = torch.addcmul(x, gate_mlp, f)
        if keep_delta:
            self._put(self.deltas, index, x - x_in)
        return x

    # --- icc: increment-calibrated reuse --------------------------------------------------------
    def _block_calibrated(self, index, block, x, t_mod, grid, k, v, bias, compute, text_context):
        """A block whose reused components are recomputed from their linear layers' input
        changes at low rank. A computed component records each linear layer's output and its
        input projected to rank r (the cache that calibration starts from); a calibrated one
        leaves the cache as it is."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(t_mod)
        attn1, attn2, ff = block.attn1, block.attn2, block.ff

        component, computing = None, True

        def linear(layer, name_in, value, name_out=None):
            """layer(value), recording input and output, where the component computes; else the
            recorded output moved by the input's change at low rank. name_out None: the
            component's output (the reuse cache)."""
            store, key = (self.outputs, (index, component)) if name_out is None else (
                self.inputs, (index, component, name_out))
            if computing:
                self._put(self.inputs, (index, component, name_in), value @ lowrank_factors(layer, rank)[0])
                return self._put(store, key, layer(value))
            cached = self._cached(index, component) if name_out is None else self._stored(index, component, name_out)
            return self._calibrate(layer, index, component, name_in, value, cached)

        text_len, rank = text_context.kv[0][0].shape[2], self.calibration_rank
        for i, component in enumerate(COMPONENTS):
            computing = bool(compute[i])
            if component == "attn1":
                qkv = linear(attn1.to_qkv, "u", modulate(block.norm(x), shift_msa, scale_msa), "qkv")
                x = torch.addcmul(x, gate_msa, linear(attn1.to_out, "o", attn1.attend(*qkv.chunk(3, dim=-1), grid)))
            elif component == "attn2":
                q = linear(attn2.to_q, "u", x, "q")
                x = x + linear(attn2.to_out, "o", attn2.attend(q, k, v, bias))
            else:
                hidden = linear(ff.fc1, "u", modulate(block.norm(x), shift_mlp, scale_mlp), "y1")
                x = torch.addcmul(x, gate_mlp, linear(ff.fc2, "h", F.gelu(hidden, approximate="tanh")))
            if computing:
                self._count(block, component, x, x.shape[1], grid, text_context)
                self.macs[component] += calibration_record_macs(block, component, x.shape[0], x.shape[1], rank)
            else:
                self.macs[component] += calibrated_macs(block, component, x.shape[0], x.shape[1], text_len, rank)
        return x

    def _stored(self, index, component, name) -> torch.Tensor:
        value = self._get(self.inputs, (index, component, name))
        if value is None:
            self._missing(index, component)
        return value

    def _calibrate(self, layer, index, component, name_in, value, cached_out) -> torch.Tensor:
        """cached_out + (value - the input it was computed from) @ W_r^T: the layer's output moved
        by its input's change through the rank-r SVD of its weight (the bias is already in
        cached_out), the change taken in the rank-r projection the computed step recorded."""
        b_t, a_t = lowrank_factors(layer, self.calibration_rank)
        projected = value @ b_t - self._stored(index, component, name_in)
        width = cached_out.shape[-1]
        moved = torch.addmm(cached_out.reshape(-1, width), projected.reshape(-1, projected.shape[-1]), a_t)
        return moved.reshape(cached_out.shape)

    def _cached(self, index, component) -> torch.Tensor:
        value = self._get(self.outputs, (index, component))
        if value is None:
            self._missing(index, component)
        return value

    def _missing(self, index, what):
        raise PixforgeError(f"cache: block {index} {what} is reused at step {self.step} but was never computed")

    def _run_schedule(self, blocks, x, t_mod, grid, text_context, schedule: CacheSchedule):
        delta = schedule.block_reuse == "delta"
        for index, (block, (k, v)) in enumerate(zip(blocks, text_context.kv)):
            compute = schedule.compute[self.step, index]
            if delta and not compute.any():
                cached = self._get(self.deltas, index)
                if cached is None:
                    self._missing(index, "deviation")
                x = x + cached
                continue
            if delta:
                compute = (True, True, True)
            x = self._block(index, block, x, t_mod, grid, k, v, text_context.bias, compute, text_context, delta)
        return x

    # --- TeaCache and first-block: decide per step --------------------------------------------
    def _run_adaptive(self, blocks, x, t_mod, grid, text_context, policy):
        first, last = self.step == 0, self.step == self.steps - 1
        full = (True, True, True)
        bias = text_context.bias
        if isinstance(policy, TeaCache):
            block0 = blocks[0]
            shift, scale = block0.modulation(t_mod)[:2]
            signal = modulate(block0.norm(x), shift, scale)
            previous = self._get(self._adaptive, "signal")
            if previous is not None:
                self._accumulated += float(np.polyval(policy.coefficients, rel_l1(signal, previous)))
            self._put(self._adaptive, "signal", signal)
            compute = first or last or self._accumulated >= policy.threshold
            if compute:
                self._accumulated = 0.0
            self.decisions.append(bool(compute))
            start = 0
        else:
            k, v = text_context.kv[0]
            x_in = x
            x = self._block(0, blocks[0], x, t_mod, grid, k, v, bias, full, text_context, True)
            residual = x - x_in
            previous = self._get(self._adaptive, "residual0")
            compute = first or last or previous is None or rel_l1(residual, previous) >= policy.threshold
            if compute:
                self._put(self._adaptive, "residual0", residual)
            self.decisions.append(bool(compute))
            start = 1
        for index in range(start, len(blocks)):
            if compute:
                k, v = text_context.kv[index]
                x = self._block(index, blocks[index], x, t_mod, grid, k, v, bias, full, text_context, True)
            else:
                x = x + self._get(self.deltas, index)
        return x

    # --- ToCa: token-wise --------------------------------------------------------------------
    def _run_toca(self, blocks, x, t_mod, grid, text_context, policy: ToCa):
        refresh = self.step % policy.interval == 0
        fractions = policy.fractions()
        bias = text_context.bias
        n = x.shape[1]
        for index, (block, (k, v)) in enumerate(zip(blocks, text_context.kv)):
            if refresh:
                x = self._toca_refresh(index, block, x, t_mod, grid, k, v, bias, text_context, fractions)
                continue
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(t_mod)
            if fractions["attn1"] >= 1:
                a1 = self.outputs[index, "attn1"] = block.self_attention(x, shift_msa, scale_msa, grid)
                self._count(block, "attn1", x, n, grid, text_context)
            else:
                a1 = self.outputs[index, "attn1"]
            x = torch.addcmul(x, gate_msa, a1)
            rows = self._select(index, "attn2", fractions["attn2"], grid, policy)
            a2 = self._partial(index, "attn2", rows, x, lambda part: block.cross_attention(part, k, v, bias))
            self._count(block, "attn2", x, rows.shape[1], grid, text_context)
            x = x + a2
            rows = self._select(index, "ff", fractions["ff"], grid, policy)
            f = self._partial(index, "ff", rows, x, lambda part: block.feed_forward(part, shift_mlp, scale_mlp))
            self._count(block, "ff", x, rows.shape[1], grid, text_context)
            x = torch.addcmul(x, gate_mlp, f)
        return x

    def _toca_refresh(self, index, block, x, t_mod, grid, k, v, bias, text_context, fractions):
        """A full step; cross-attention runs on explicit probabilities so that each token's
        sharpness (its score until the next refresh) comes at no extra matmul."""
        batch, n = x.shape[:2]
        for component in ("attn2", "ff"):
            self._stale[index, component] = torch.zeros(batch, n, device=x.device)
        if min(fractions.values()) >= 1:
            return self._block(index, block, x, t_mod, grid, k, v, bias, (True, True, True), text_context, False)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(t_mod)
        a1 = self.outputs[index, "attn1"] = block.self_attention(x, shift_msa, scale_msa, grid)
        x = torch.addcmul(x, gate_msa, a1)
        a2, self._scores[index] = cross_attention_with_sharpness(block.attn2, x, k, v, bias)
        self.outputs[index, "attn2"] = a2
        x = x + a2
        f = self.outputs[index, "ff"] = block.feed_forward(x, shift_mlp, scale_mlp)
        x = torch.addcmul(x, gate_mlp, f)
        for component in COMPONENTS:
            self._count(block, component, x, n, grid, text_context)
        return x

    def _select(self, index, component, fraction, grid, policy: ToCa) -> torch.Tensor:
        """(B, n_sel) token indices to recompute, highest score first."""
        stale = self._stale[index, component]
        batch, n = stale.shape
        count = max(0, min(n, math.ceil(fraction * n - 1e-9)))
        if count == n:
            rows = torch.arange(n, device=stale.device).expand(batch, n)
        else:
            score = self._scores.get(index)
            score = torch.zeros_like(stale) if score is None else score.clone()
            score += policy.staleness_weight * stale / policy.interval
            if policy.window > 1:
                h, w = grid
                cell = score.reshape(batch, 1, h, w)
                peak = F.max_pool2d(cell, policy.window, stride=policy.window, ceil_mode=True)
                peak = F.interpolate(peak, scale_factor=policy.window, mode="nearest")[:, :, :h, :w]
                score = score + (cell >= peak).reshape(batch, n).float()
            rows = score.topk(count, dim=1).indices
        stale += 1
        stale.scatter_(1, rows, 0.0)
        return rows

    def _partial(self, index, component, rows, x, fn) -> torch.Tensor:
        """Recompute the component on `rows` only; the other tokens keep their cached output."""
        cached = self.outputs.get((index, component))
        if cached is None:
            self._missing(index, component)
        gather = rows[..., None].expand(-1, -1, x.shape[-1])
        fresh = fn(torch.gather(x, 1, gather))
        out = cached.scatter(1, gather, fresh.to(cached.dtype))
        self.outputs[index, component] = out
        return out


def cross_attention_with_sharpness(attn, x, k, v, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """PixArt cross-attention output, and each token's sharpness over the text: 1 - its
    attention entropy / log(text length), averaged over heads, (B, N) in [0, 1]."""
    batch, n, dim = x.shape
    q = attn.to_q(x).reshape(batch, n, attn.heads, dim // attn.heads).transpose(1, 2)  # (B, H, N, d)
    if k.shape[0] != batch:
        repeat = batch // k.shape[0]
        k, v = k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)
        bias = None if bias is None else bias.repeat_interleave(repeat, 0)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, L)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(-1)
    out = attn.to_out((probs @ v).transpose(1, 2).reshape(batch, n, dim))
    p = probs.float()
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean(1)  # (B, N)
    length = k.shape[2] if bias is None else (bias[:, 0, 0] > -1).sum(-1, keepdim=True).clamp_min(2)
    return out, 1 - entropy / torch.log(torch.as_tensor(length, dtype=torch.float32, device=x.device))


# ------------------------------------------------------------------------------------
# Spec strings: what `--cache` and `pipe(cache=...)` accept
# ------------------------------------------------------------------------------------
POLICIES = {"fora": Fora, "delta-dit": DeltaDiT, "toca": ToCa, "teacache": TeaCache, "first-block": FirstBlockCache,
            "late-dense": LateDense, "cfg-cache": CfgCache}
# The first positional value of each policy ("fora:3" = interval 3, "teacache:0.1" = threshold 0.1).
_POSITIONAL = {"fora": "interval", "delta-dit": "interval", "toca": "interval", "teacache": "threshold",
               "first-block": "threshold", "late-dense": "fraction", "cfg-cache": "interval"}

CACHE_HELP = (
    "none | fora:N | delta-dit:interval=2,boundary=0.5,blocks=K | toca:interval=3,ratio=0.3 | "
    "teacache:THRESHOLD | first-block:THRESHOLD | late-dense:FRACTION,gamma=0.5 | cfg-cache:N | "
    "path/to/schedule.json (ours or ECAD's) | any of these but toca + cfg-cache:N (e.g. fora:2+cfg-cache:3) | "
    "a static one + icc:RANK (increment-calibrated reuse, e.g. fora:3+icc:16) | "
    "a schedule the model ships, by name (the default model: ecad, ecad-fast)"
)
# A model folder's searched schedules: MODEL/cache/NAME.json, used as `cache="NAME"`.
MODEL_SCHEDULES_DIR = "cache"
_SCHEDULE_NAME = re.compile(r"[a-z][a-z0-9_-]*")


def load_model_schedules(folder: str | Path) -> dict[str, CacheSchedule]:
    """The named schedules a model folder ships (`folder/cache/*.json`), by file stem. A name
    that is a policy's, or not lower-case letters, digits, '-' and '_', is refused."""
    found = {}
    for path in sorted(Path(folder, MODEL_SCHEDULES_DIR).glob("*.json")):
        name = path.stem
        if not _SCHEDULE_NAME.fullmatch(name) or name in POLICIES or name in ("none", "off", "icc"):
            raise PixforgeError(f"{path}: a model's schedule needs a name of lower-case letters, digits, '-' and '_' "
                                f"that is no policy's ({', '.join(POLICIES)}, icc, none, off)")
        found[name] = replace(CacheSchedule.load(path), name=name)  # generations record the name they were asked by
    return found


def _parse_value(policy: str, key: str, text: str):
    try:
        if key in ("interval", "blocks", "window"):
            return int(text)
        value = float(text)
    except ValueError as error:
        raise PixforgeError(f"cache policy {policy}: {key}={text!r} is not a number") from error
    if not math.isfinite(value):
        raise PixforgeError(f"cache policy {policy}: {key}={text!r} must be finite")
    return value


def parse_cache_spec(spec, teacache_coefficients: tuple[float, ...] | None = None,
                     schedules: dict[str, CacheSchedule] | None = None):
    """A policy from a spec string, a schedule file path, a dict (schedule JSON), or a policy;
    `schedules`: the model's named schedules (`load_model_schedules`), usable by name.

    Returns None for no cache. Raises PixforgeError naming the problem otherwise.
    """
    if spec is None or isinstance(spec, (Fora, DeltaDiT, LateDense, ToCa, TeaCache, FirstBlockCache, CacheSchedule,
                                         CfgCache, WithCfgCache, Icc)):
        return spec
    if isinstance(spec, dict):
        return CacheSchedule.from_dict(spec)
    if isinstance(spec, Path):
        return CacheSchedule.load(spec)
    if not isinstance(spec, str):
        raise PixforgeError(f"cache={spec!r} is not a policy spec; use {CACHE_HELP}")
    text = spec.strip()
    if text.lower() in ("", "none", "off"):
        return None
    base, plus, extra = text.rpartition("+")
    if plus and extra.strip().lower().startswith("cfg-cache"):
        cfg = parse_cache_spec(extra, teacache_coefficients, schedules)
        policy = parse_cache_spec(base, teacache_coefficients, schedules)
        return cfg if policy is None else WithCfgCache(policy, cfg)
    if plus and extra.strip().lower().startswith("icc"):
        _, _, value = extra.partition(":")
        key, eq, rank = value.partition("=")
        rank = rank if eq else key
        if eq and key.strip() != "rank":
            raise PixforgeError(f"cache policy icc has no parameter {key.strip()!r}; it takes rank (icc:16)")
        try:
            rank = int(rank.strip()) if rank.strip() else Icc.rank
        except ValueError as error:
            raise PixforgeError(f"cache policy icc: rank={rank.strip()!r} is not an integer") from error
        policy = parse_cache_spec(base, teacache_coefficients, schedules)
        if policy is None:
            raise PixforgeError(f"cache={text!r}: icc calibrates a policy's reuse; give one (e.g. fora:3+icc:16)")
        return Icc(policy, rank)
    if plus and not Path(text).is_file():
        raise PixforgeError(f"cache={text!r}: only cfg-cache:N and icc:R combine with another policy "
                            f"(POLICY+cfg-cache:N, POLICY+icc:R)")
    if text.endswith(".json") or "/" in text or Path(text).is_file():
        return CacheSchedule.load(text)
    name, _, args = text.partition(":")
    name = name.strip().lower()
    if schedules and name in schedules and not args:
        return schedules[name]
    if name not in POLICIES:
        shipped = f"; this model ships {', '.join(sorted(schedules))}" if schedules else ""
        raise PixforgeError(f"unknown cache policy {name!r}; use {CACHE_HELP}{shipped}")
    cls = POLICIES[name]
    known = {f for f in cls.__dataclass_fields__ if f != "coefficients"}
    kwargs = {}
    for position, part in enumerate(p for p in args.split(",") if p.strip()):
        key, eq, value = part.partition("=")
        if not eq:
            if position:
                raise PixforgeError(f"cache policy {name}: only the first value may omit its name ({part!r})")
            key, value = _POSITIONAL[name], key
        key = key.strip()
        if key not in known:
            raise PixforgeError(f"cache policy {name} has no parameter {key!r}; it takes {', '.join(sorted(known))}")
        kwargs[key] = _parse_value(name, key, value.strip())
    if name == "teacache" and teacache_coefficients is not None:
        kwargs["coefficients"] = tuple(teacache_coefficients)
    return cls(**kwargs)


def is_static(policy) -> bool:
    """Whether a policy's decisions depend on the step alone (a schedule fixed in advance), not on
    the features of the batch it runs in: such a policy gives every image of a batch what it
    would get alone, so requests with it can share a batch."""
    if isinstance(policy, WithCfgCache):
        return is_static(policy.policy)
    return isinstance(policy, (CacheSchedule, Fora, DeltaDiT, LateDense, CfgCache, Icc))


def inner_schedule(policy) -> CacheSchedule | None:
    """The schedule a policy runs, alone or under +cfg-cache / +icc; None for other policies."""
    while isinstance(policy, (WithCfgCache, Icc)):
        policy = policy.policy
    return policy if isinstance(policy, CacheSchedule) else None


def searched_schedule(policy) -> CacheSchedule | None:
    """The searched schedule inside a policy (alone, +cfg-cache, +icc), if it records its model."""
    schedule = inner_schedule(policy)
    return schedule if schedule is not None and schedule.searched_on else None


def schedule_guidance_scale(policy) -> float | None:
    """The guidance scale a schedule inside a policy (alone, +cfg-cache, +icc) was measured at, if
    it records one: the scale a generation that names none uses."""
    schedule = inner_schedule(policy)
    return None if schedule is None else schedule.guidance_scale


def policy_name(policy) -> str:
    return "none" if policy is None else policy.name
