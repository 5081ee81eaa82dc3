"""Image sizes: validation, PixArt's aspect-ratio bins, and resizing back to the asked size.

PixArt was trained on aspect-ratio buckets ("bins"): (height, width) pairs keyed by
height / width, one table per base resolution (256, 512, 1024 and Σ's 2048; the values
are diffusers' `ASPECT_RATIO_*_BIN`). Binning generates at the bucket nearest the asked
aspect ratio and resizes the image back. diffusers only bins models whose sample size is
32, 64, 128 or 256 and raises otherwise; we scale the nearest table to any model's native
size instead (rounded to the size multiple the model needs).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pixforge.errors import PixforgeError

MAX_SIDE = 4096  # pixels; the largest PixArt bucket (Σ-2K) is 4096 x 1024

# base resolution -> {height / width as written by PixArt: (height, width)}
ASPECT_RATIO_BINS: dict[int, dict[str, tuple[int, int]]] = {
    256: {
        "0.25": (128, 512), "0.28": (128, 464), "0.32": (144, 448), "0.33": (144, 432),
        "0.35": (144, 416), "0.4": (160, 400), "0.42": (160, 384), "0.48": (176, 368),
        "0.5": (176, 352), "0.52": (176, 336), "0.57": (192, 336), "0.6": (192, 320),
        "0.68": (208, 304), "0.72": (208, 288), "0.78": (224, 288), "0.82": (224, 272),
        "0.88": (240, 272), "0.94": (240, 256), "1.0": (256, 256), "1.07": (256, 240),
        "1.13": (272, 240), "1.21": (272, 224), "1.29": (288, 224), "1.38": (288, 208),
        "1.46": (304, 208), "1.67": (320, 192), "1.75": (336, 192), "2.0": (352, 176),
        "2.09": (368, 176), "2.4": (384, 160), "2.5": (400, 160), "3.0": (432, 144), "4.0": (512, 128),
    },
    512: {
        "0.25": (256, 1024), "0.28": (256, 928), "0.32": (288, 896), "0.33": (288, 864),
        "0.35": (288, 832), "0.4": (320, 800), "0.42": (320, 768), "0.48": (352, 736),
        "0.5": (352, 704), "0.52": (352, 672), "0.57": (384, 672), "0.6": (384, 640),
        "0.68": (416, 608), "0.72": (416, 576), "0.78": (448, 576), "0.82": (448, 544),
        "0.88": (480, 544), "0.94": (480, 512), "1.0": (512, 512), "1.07": (512, 480),
        "1.13": (544, 480), "1.21": (544, 448), "1.29": (576, 448), "1.38": (576, 416),
        "1.46": (608, 416), "1.67": (640, 384), "1.75": (672, 384), "2.0": (704, 352),
        "2.09": (736, 352), "2.4": (768, 320), "2.5": (800, 320), "3.0": (864, 288),
        "4.0": (1024, 256),
    },
    1024: {
        "0.25": (512, 2048), "0.28": (512, 1856), "0.32": (576, 1792), "0.33": (576, 1728),
        "0.35": (576, 1664), "0.4": (640, 1600), "0.42": (640, 1536), "0.48": (704, 1472),
        "0.5": (704, 1408), "0.52": (704, 1344), "0.57": (768, 1344), "0.6": (768, 1280),
        "0.68": (832, 1216), "0.72": (832, 1152), "0.78": (896, 1152), "0.82": (896, 1088),
        "0.88": (960, 1088), "0.94": (960, 1024), "1.0": (1024, 1024), "1.07": (1024, 960),
        "1.13": (1088, 960), "1.21": (1088, 896), "1.29": (1152, 896), "1.38": (1152, 832),
        "1.46": (1216, 832), "1.67": (1280, 768), "1.75": (1344, 768), "2.0": (1408, 704),
        "2.09": (1472, 704), "2.4": (1536, 640), "2.5": (1600, 640), "3.0": (1728, 576),
        "4.0": (2048, 512),
    },
    2048: {
        "0.25": (1024, 4096), "0.26": (1024, 3968), "0.27": (1024, 3840), "0.28": (1024, 3712),
        "0.32": (1152, 3584), "0.33": (1152, 3456), "0.35": (1152, 3328), "0.4": (1280, 3200),
        "0.42": (1280, 3072), "0.48": (1408, 2944), "0.5": (1408, 2816), "0.52": (1408, 2688),
        "0.57": (1536, 2688), "0.6": (1536, 2560), "0.68": (1664, 2432), "0.72": (1664, 2304),
        "0.78": (1792, 2304), "0.82": (1792, 2176), "0.88": (1920, 2176), "0.94": (1920, 2048),
        "1.0": (2048, 2048), "1.07": (2048, 1920), "1.13": (2176, 1920), "1.21": (2176, 1792),
        "1.29": (2304, 1792), "1.38": (2304, 1664), "1.46": (2432, 1664), "1.67": (2560, 1536),
        "1.75": (2688, 1536), "2.0": (2816, 1408), "2.09": (2944, 1408), "2.4": (3072, 1280),
        "2.5": (3200, 1280), "2.89": (3328, 1152), "3.0": (3456, 1152), "3.11": (3584, 1152),
        "3.62": (3712, 1024), "3.75": (3840, 1024), "3.88": (3968, 1024), "4.0": (4096, 1024),
    },
}


def check_size(height: object, width: object, multiple: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """Validate a generation size in pixels: positive ints, multiples of `multiple`, at most `max_side`."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise PixforgeError(f"{name}={value!r} must be an int number of pixels")
        if not multiple <= value <= max_side:
            raise PixforgeError(f"{name}={value} is out of range: use {multiple}..{max_side} pixels")
        if value % multiple:
            lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
            hint = f"{upper}" if lower < multiple else f"{lower} or {upper}"
            raise PixforgeError(
                f"{name}={value} is not a multiple of {multiple} (VAE factor x patch size); use e.g. {hint}, "
                f"or pass use_resolution_binning=True to generate at the nearest bucket and resize"
            )
    return int(height), int(width)


def bins_for(native_size: int, multiple: int) -> dict[str, tuple[int, int]]:
    """The aspect-ratio table for a model whose native (square) size is `native_size` pixels.

    The published sizes (256, 512, 1024, 2048) get PixArt's own tables; any other size gets
    the table of the nearest base (on a log scale), scaled and rounded to `multiple`.
    """
    if native_size in ASPECT_RATIO_BINS:
        table = ASPECT_RATIO_BINS[native_size]
        if all(h % multiple == 0 and w % multiple == 0 for h, w in table.values()):
            return table
    base = min(ASPECT_RATIO_BINS, key=lambda b: abs(math.log(b / native_size)))
    scale = native_size / base

    def snap(pixels: int) -> int:
        return max(multiple, int(pixels * scale / multiple + 0.5) * multiple)  # half up

    return {ratio: (snap(h), snap(w)) for ratio, (h, w) in ASPECT_RATIO_BINS[base].items()}


def nearest_bin(height: int, width: int, table: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(height, width) of the bucket whose ratio is closest to height / width (diffusers' rule)."""
    ratio = height / width
    key = min(table, key=lambda r: abs(float(r) - ratio))
    return table[key]


def resize_and_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, height, width): bilinear resize to cover, then centre crop.

    The same operations as diffusers' `resize_and_crop_tensor`, so binned outputs match.
    """
    old_height, old_width = images.shape[-2:]
    if (old_height, old_width) == (height, width):
        return images
    ratio = max(height / old_height, width / old_width)
    resized_height, resized_width = int(old_height * ratio), int(old_width * ratio)
    images = F.interpolate(images, size=(resized_height, resized_width), mode="bilinear", align_corners=False)
    top, left = (resized_height - height) // 2, (resized_width - width) // 2
    return images[:, :, top : top + height, left : left + width]


__all__ = ["MAX_SIDE", "ASPECT_RATIO_BINS", "check_size", "bins_for", "nearest_bin", "resize_and_crop"]
