"""Programmatic compositional checker for the shapes world (GenEval-style, no learned model).

detect(): background from the border, every pixel explained as a mix of the background
and one palette colour (robust to anti-aliasing, blur and drift), connected components of
the foreground, colour by an area-weighted vote, shape by bounding-box fill ratio.
check(): the found objects against a caption or a CaptionSpec, per ../../../docs/evaluation.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from pixforge.errors import PixforgeError
from pixforge.shapes.world import (
    BACKGROUNDS,
    COLORS,
    MIN_SIZE_FRACTION,
    RELATION_PHRASES,
    CaptionSpec,
    parse_caption,
)

_COLOR_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)  # (8, 3)


def hue_degrees(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hue in degrees, chroma) of RGB pixels (..., 3). Mixing a colour with a white, gray or
    black background changes its chroma, never its hue, and so do brightness, contrast and
    saturation changes: hue is what identifies a palette colour under anti-aliasing and drift."""
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    hue = np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)) % 360.0
    chroma = pixels.max(axis=-1) - pixels.min(axis=-1)
    return hue, chroma


_PALETTE_HUES = hue_degrees(_PALETTE)[0]  # (8,)


@dataclass(frozen=True)
class CheckerConfig:
    min_mix: float = 0.5  # a pixel is foreground when it is at least half object colour
    core_mix: float = 0.75  # pixels voting on a component's colour
    split_mix: float = 0.8  # pixels that seed objects when a component holds several (split_touching)
    max_residual: float = 70.0  # RGB distance from every background→colour line: "not in the palette"
    max_hue_gap: float = 20.0  # degrees from the nearest palette hue; beyond: an off-palette colour
    min_chroma: float = 40.0  # an object must be coloured, not gray
    min_area_fraction: float = 0.35  # of the smallest legal object (a minimum-size triangle)
    triangle_max_taper: float = 0.55  # see shape_features(); measured ranges in docs/evaluation.md
    square_min_corners: float = 0.56
    circle_min_fill: float = 0.6
    max_aspect: float = 1.6  # longer/shorter bbox side beyond this: not a shape of the world
    relation_min_fraction: float = 0.10  # centre offset along the axis, fraction of that side


@dataclass(frozen=True)
class FoundObject:
    color: str  # a palette name or "unknown"
    shape: str  # circle | square | triangle | unknown
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    center: tuple[float, float]
    area: int
    fill: float

    def to_json(self) -> dict:
        # Plain Python numbers: numpy scalars from the detector are not JSON-serialisable.
        return {"color": self.color, "shape": self.shape, "bbox": [int(v) for v in self.bbox],
                "center": [round(float(v), 2) for v in self.center], "area": int(self.area),
                "fill": round(float(self.fill), 3)}


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    reason: str  # "" when passed, else every failed rule, joined by "; "
    found: list[FoundObject] = field(default_factory=list)
    background: str = "white"


def to_rgb_array(image) -> np.ndarray:
    """PIL image or (H, W, 3) uint8/float array → (H, W, 3) float32 in 0–255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise PixforgeError(f"image array has shape {array.shape}; expected (H, W, 3)")
    if array.dtype != np.uint8 and array.max() <= 1.0:
        array = array * 255.0
    return array.astype(np.float32)


def estimate_background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """Median of the 2-pixel border: objects touch the border over a small part of it at most."""
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    rgb = np.median(border, axis=0)
    names = list(BACKGROUNDS)
    distances = [np.linalg.norm(rgb - np.array(BACKGROUNDS[n], dtype=np.float32)) for n in names]
    return names[int(np.argmin(distances))], rgb


def unmix(pixels: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Explain each pixel as background + mix × (colour − background) for its best palette colour.

    Returns (best colour index (H, W), mix in [0, 1] (H, W), residual distance (H, W)).
    Anti-aliased and blurred edges lie on these lines, so they keep their colour.
    """
    offset = pixels - background  # (H, W, 3)
    directions = _PALETTE - background  # (8, 3)
    lengths = np.maximum((directions**2).sum(axis=1), 1e-6)  # (8,)
    mix = np.clip(offset @ directions.T / lengths, 0.0, 1.0)  # (H, W, 8)
    residual = np.linalg.norm(offset[..., None, :] - mix[..., None] * directions, axis=-1)  # (H, W, 8)
    best = residual.argmin(axis=-1)  # (H, W)
    take = best[..., None]
    return best, np.take_along_axis(mix, take, -1)[..., 0], np.take_along_axis(residual, take, -1)[..., 0]


def shape_features(mask: np.ndarray) -> tuple[float, float, float]:
    """(fill, taper, corners) of one component cropped to its bounding box.

    fill: fraction of the box covered (square 1, circle π/4, triangle 1/2);
    taper: the narrower of the top and bottom quarters over the wider (triangle ≈ 0.15, else 1);
    corners: coverage of the four corner boxes of 22% side (square 1, circle ≈ 0.2).
    Taper and corners survive blur and JPEG better than fill alone.
    """
    height, width = mask.shape
    quarter = max(1, round(height / 4))
    top, bottom = mask[:quarter].mean(), mask[-quarter:].mean()
    k = max(1, round(0.22 * min(height, width)))
    corners = np.mean([mask[:k, :k].mean(), mask[:k, -k:].mean(), mask[-k:, :k].mean(), mask[-k:, -k:].mean()])
    return float(mask.mean()), float(min(top, bottom) / max(top, bottom, 1e-6)), float(corners)


def classify_shape(mask: np.ndarray, config: CheckerConfig = CheckerConfig()) -> tuple[str, float]:
    """(shape name, fill) of one component cropped to its bounding box."""
    height, width = mask.shape
    fill, taper, corners = shape_features(mask)
    if max(height, width) > config.max_aspect * min(height, width):
        return "unknown", fill
    if taper < config.triangle_max_taper:
        return "triangle", fill
    if corners >= config.square_min_corners:
        return "square", fill
    if fill >= config.circle_min_fill:
        return "circle", fill
    return "unknown", fill


def detect(image, config: CheckerConfig = CheckerConfig()) -> tuple[str, list[FoundObject]]:
    """(background name, objects found) in an RGB image of the shapes world."""
    pixels = to_rgb_array(image)
    height, width = pixels.shape[:2]
    background, background_rgb = estimate_background(pixels)
    best, mix, residual = unmix(pixels, background_rgb)
    foreground = (mix >= config.min_mix) & (residual <= config.max_residual * 1.5)
    labels, count = ndimage.label(foreground)
    smallest = 0.5 * (MIN_SIZE_FRACTION * min(height, width)) ** 2
    min_area = config.min_area_fraction * smallest
    found = []
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        for component, region in split_touching(labels[region] == index, region, mix[region], min_area, config):
            found.append(_describe_component(component, region, pixels, mix, background_rgb, config))
    return background, found


def split_touching(component: np.ndarray, region: tuple[slice, slice], mix: np.ndarray, min_area: float,
                   config: CheckerConfig = CheckerConfig()) -> list:
    """[(mask, region)] of the objects in one connected component.

    Blur and JPEG can bridge the 2-pixel gap between neighbours. The shapes are convex, so
    eroding a single one never splits it while eroding a bridged pair does; a bridge is also
    fainter than the objects it joins, so the component's strongest pixels split too.
    Pixels go to the nearest piece. Only a component that is no shape of the world is split,
    so noise inside one object never breaks it up."""
    if component.sum() < min_area:
        return []
    if classify_shape(component, config)[0] != "unknown":
        return [(component, region)]
    strong = component & (mix >= config.split_mix * np.percentile(mix[component], 90))
    candidates = (
        lambda: ndimage.binary_erosion(component, iterations=1),
        lambda: ndimage.binary_erosion(component, iterations=2),
        lambda: strong,
        lambda: ndimage.binary_erosion(strong, iterations=1),
    )
    for candidate in candidates:
        eroded = candidate()
        pieces, count = ndimage.label(eroded)
        if count < 2:
            continue
        sizes = ndimage.sum(eroded, pieces, index=range(1, count + 1))
        keep = [i + 1 for i, size in enumerate(sizes) if size >= 0.5 * min_area]
        if len(keep) < 2:
            continue
        seeds = np.where(np.isin(pieces, keep), pieces, 0)
        nearest = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
        owner = seeds[nearest[0], nearest[1]] * component  # (h, w): label of the nearest piece
        parts = []
        for label in keep:
            part = owner == label
            rows, cols = np.nonzero(part)
            box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
            sub_region = (slice(region[0].start + box[0].start, region[0].start + box[0].stop),
                          slice(region[1].start + box[1].start, region[1].start + box[1].stop))
            if part.sum() >= min_area:
                parts.append((part[box], sub_region))
        return parts
    return [(component, region)]


def _describe_component(component, region, pixels, mix, background_rgb, config) -> FoundObject:
    area = int(component.sum())
    core = component & (mix[region] >= config.core_mix)
    voters = core if core.sum() >= 0.2 * area else component
    color = component_color(pixels[region][voters], background_rgb, config)
    shape, fill = classify_shape(component, config)
    ys, xs = np.nonzero(component)
    y0, x0 = region[0].start, region[1].start
    center = (x0 + float(xs.mean()) + 0.5, y0 + float(ys.mean()) + 0.5)
    bbox = (x0, y0, region[1].stop, region[0].stop)
    return FoundObject(color, shape, bbox, center, area, fill)


def component_color(pixels: np.ndarray, background: np.ndarray, config: CheckerConfig = CheckerConfig()) -> str:
    """Palette name of one object's pixels (N, 3): the palette hue nearest to their chroma-weighted
    circular mean hue, or "unknown" when that hue is off the palette or the pixels do not lie near
    the background→colour line (brown is orange's hue but not orange)."""
    hue, chroma = hue_degrees(pixels)
    angle = np.radians(hue)
    mean_hue = np.degrees(np.arctan2((chroma * np.sin(angle)).sum(), (chroma * np.cos(angle)).sum())) % 360
    gaps = np.abs((_PALETTE_HUES - mean_hue + 180.0) % 360.0 - 180.0)  # (8,)
    index = int(gaps.argmin())
    if gaps[index] > config.max_hue_gap or np.median(chroma) < config.min_chroma:
        return "unknown"
    direction = _PALETTE[index] - background
    mix = np.clip((pixels - background) @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    residual = np.linalg.norm(pixels - background - mix[:, None] * direction, axis=-1)
    if np.median(residual) > config.max_residual:
        return "unknown"
    return _COLOR_NAMES[index]


def describe(color: str, shape: str, count: int) -> str:
    noun = shape if count == 1 else shape + "s"
    return f"{count} {color} {noun}"


def relation_holds(a: FoundObject, b: FoundObject, relation: str, width: int, height: int,
                   config: CheckerConfig = CheckerConfig()) -> bool:
    """Looser than the renderer's rule: a's centre is on the named side of b's, by ≥10% of the
    side, and further along that axis than across it (within 45°)."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    along, across, side = {
        "left of": (-dx, dy, width), "right of": (dx, dy, width),
        "above": (-dy, dx, height), "below": (dy, dx, height),
    }[relation]
    return along >= config.relation_min_fraction * side and along > abs(across)


def check(image, expected: str | CaptionSpec, config: CheckerConfig = CheckerConfig()) -> CheckResult:
    """Does `image` show exactly what `expected` (a caption or a CaptionSpec) names?"""
    spec = parse_caption(expected) if isinstance(expected, str) else expected
    pixels = to_rgb_array(image)
    height, width = pixels.shape[:2]
    background, found = detect(pixels, config)
    reasons = []
    if background != spec.expected_background:
        reasons.append(f"expected {spec.expected_background} background, found {background}")

    wanted = spec.counts()
    have: dict[tuple[str, str], int] = {}
    for obj in found:
        have[(obj.color, obj.shape)] = have.get((obj.color, obj.shape), 0) + 1
    for (color, shape), count in wanted.items():
        got = have.get((color, shape), 0)
        if got != count:
            reasons.append(f"expected {describe(color, shape, count)}, found {got}")
    for (color, shape), got in have.items():
        if (color, shape) not in wanted:
            reasons.append(f"found {describe(color, shape, got)} not in the caption")

    if spec.relation is not None and not reasons:
        first, second = spec.groups[0], spec.groups[1]
        firsts = [o for o in found if (o.color, o.shape) == (first.color, first.shape)]
        seconds = [o for o in found if (o.color, o.shape) == (second.color, second.shape)]
        if not any(relation_holds(a, b, spec.relation, width, height, config)
                   for a in firsts for b in seconds if a is not b):
            a, b = firsts[0], seconds[-1]
            reasons.append(
                f"expected the {first.color} {first.shape} {RELATION_PHRASES[spec.relation]} the "
                f"{second.color} {second.shape}; centres differ by dx={a.center[0] - b.center[0]:+.1f}, "
                f"dy={a.center[1] - b.center[1]:+.1f} px"
            )
    return CheckResult(not reasons, "; ".join(reasons), found, background)


def _passes(arrays: list, captions: list[str]) -> list[bool]:
    return [check(array, caption).passed for array, caption in zip(arrays, captions)]


def default_check_workers(device: str = "cuda") -> int:
    """Checker processes worth starting beside generation on `device` (a device type): the cores
    but two beside a GPU; none for a CPU, or on a machine of four cores or fewer, where generation
    already uses the cores."""
    import os

    if device == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 4 else min(cores - 2, 32)


class CheckPool:
    """The shapes checker over batches of images, in `workers` spawned processes (safe beside
    CUDA), so checking one batch overlaps generating the next. With 0 workers it checks at once,
    in this process. `submit` returns a function that gives the verdicts in order; they are
    those of `check` either way (tested)."""

    def __init__(self, workers: int = 0, chunk: int = 32):
        self.workers, self.chunk = workers, chunk
        self._pool = None

    def submit(self, images, captions) -> Callable[[], list[bool]]:
        captions = list(captions)
        if len(captions) != len(images):
            raise PixforgeError(f"{len(images)} images but {len(captions)} captions to check")
        if not self.workers:
            verdicts = [check(image, caption).passed for image, caption in zip(images, captions)]
            return lambda: verdicts
        if self._pool is None:
            import multiprocessing
            import weakref
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            weakref.finalize(self, self._pool.shutdown, cancel_futures=True)
        arrays = [np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
                  for image in images]
        futures = [self._pool.submit(_passes, arrays[i:i + self.chunk], captions[i:i + self.chunk])
                   for i in range(0, len(arrays), self.chunk)]
        return lambda: [verdict for future in futures for verdict in future.result()]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
