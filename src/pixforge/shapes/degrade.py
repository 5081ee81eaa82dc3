"""Degradations that imitate what generated images get wrong at the pixel level: blur,
sensor-like noise, JPEG artefacts and colour drift. Used to test the checker's robustness
and that FID grows with damage. Each takes and returns an RGB PIL image."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter


def gaussian_blur(image: Image.Image, sigma: float) -> Image.Image:
    if sigma <= 0:
        return image
    return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def gaussian_noise(image: Image.Image, std: float, rng: np.random.Generator) -> Image.Image:
    """Adds N(0, std²) per channel, in 0–255 units."""
    if std <= 0:
        return image
    pixels = np.asarray(image, dtype=np.float32)
    noisy = pixels + rng.normal(0.0, std, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """Round trip through JPEG at `quality` (1–95), with 4:2:0 chroma subsampling."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def color_jitter(
    image: Image.Image,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    rng: np.random.Generator,
) -> Image.Image:
    """torchvision-style jitter: factors drawn from [1-x, 1+x], hue shifted by a fraction of
    the colour circle drawn from [-hue, hue]."""
    out = image
    if brightness > 0:
        out = ImageEnhance.Brightness(out).enhance(rng.uniform(1 - brightness, 1 + brightness))
    if contrast > 0:
        out = ImageEnhance.Contrast(out).enhance(rng.uniform(1 - contrast, 1 + contrast))
    if saturation > 0:
        out = ImageEnhance.Color(out).enhance(rng.uniform(1 - saturation, 1 + saturation))
    if hue > 0:
        shift = int(round(rng.uniform(-hue, hue) * 255))
        h, s, v = out.convert("HSV").split()
        h = h.point(lambda x: (x + shift) % 256)
        out = Image.merge("HSV", (h, s, v)).convert("RGB")
    return out


@dataclass(frozen=True)
class DegradeConfig:
    """Strength 1 of each degradation; `degrade(image, strength)` scales all of them."""

    blur_sigma: float = 1.0
    noise_std: float = 8.0
    jpeg_quality_drop: int = 60  # quality = 95 - drop × strength
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.15
    hue: float = 0.02  # ±7° of hue


def degrade(
    image: Image.Image, strength: float, rng: np.random.Generator, config: DegradeConfig = DegradeConfig()
) -> Image.Image:
    """All four degradations at `strength` × their strength-1 values (0 returns the image)."""
    if strength <= 0:
        return image
    out = color_jitter(image, config.brightness * strength, config.contrast * strength,
                       config.saturation * strength, config.hue * strength, rng)
    out = gaussian_blur(out, config.blur_sigma * strength)
    out = gaussian_noise(out, config.noise_std * strength, rng)
    return jpeg(out, round(95 - config.jpeg_quality_drop * strength))
