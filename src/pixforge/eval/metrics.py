"""FID and KID in the shapes world.

No Inception weights can be downloaded here, and Inception features would say little about
flat coloured shapes anyway. The feature space is the penultimate layer (64-d) of a small CNN
trained on the shapes world to count every colour × shape and name the background
(scripts/train_shapes_features.py; weights in pixforge/assets/shapes_features.safetensors).
The statistics come from torchmetrics, which takes any nn.Module as its feature extractor.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from pixforge.errors import PixforgeError

FEATURE_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "shapes_features.safetensors"
INPUT_SIZE = 128  # full detail of the default canvas: blur, noise and JPEG artefacts stay visible
NUM_PAIRS = 24  # colour × shape
MAX_COUNT = 4
NUM_BACKGROUNDS = 3
NUM_DEGRADATIONS = 4  # blur, noise, jpeg, colour jitter: the strength of each in [0, 1]


class ShapesFeatureNet(nn.Module):
    """uint8 images (N, 3, H, W) of any size → features (N, 64), layer-normalised.

    `heads()` gives the training targets' logits: counts (N, 24, 5) per colour × shape,
    background (N, 3), and the strength of each degradation (N, 4) — the last so that the
    features see image quality as well as content, as Inception features do for photos."""

    num_features = 64

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.convs = nn.Sequential(
            nn.Conv2d(3, w, 4, stride=2, padding=1), nn.GroupNorm(8, w), nn.GELU(),  # 64²
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.GELU(),  # 32²
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.GELU(),  # 16²
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.GELU(),  # 8²
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.GELU(),  # 4²
        )
        self.embed = nn.Linear(2 * w * 16, self.num_features)
        self.count_head = nn.Linear(self.num_features, NUM_PAIRS * (MAX_COUNT + 1))
        self.background_head = nn.Linear(self.num_features, NUM_BACKGROUNDS)
        self.degradation_head = nn.Linear(self.num_features, NUM_DEGRADATIONS)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """float images (N, 3, 128, 128) in [0, 1] → (N, 64)."""
        hidden = self.convs(images * 2.0 - 1.0)  # (N, 64, 4, 4)
        embedded = self.embed(hidden.flatten(1))  # (N, 64)
        return F.layer_norm(embedded, (self.num_features,))  # unit scale: FID/KID in comparable units

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        counts = self.count_head(features).view(-1, NUM_PAIRS, MAX_COUNT + 1)  # (N, 24, 5)
        return counts, self.background_head(features), self.degradation_head(features)  # (N, 3), (N, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(prepare(images))


def prepare(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) → float (N, 3, 128, 128) in [0, 1]: resized, aspect ignored."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def to_uint8_batch(images: list) -> torch.Tensor:
    """PIL images or (H, W, 3) arrays of any sizes → uint8 (N, 3, 128, 128)."""
    batch = []
    for image in images:
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        image = image.convert("RGB")
        if image.size != (INPUT_SIZE, INPUT_SIZE):
            image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BOX)
        batch.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(batch)


def load_feature_net(path: str | Path | None = None) -> ShapesFeatureNet:
    from safetensors.torch import load_file

    path = Path(path) if path is not None else FEATURE_WEIGHTS
    if not path.is_file():
        raise PixforgeError(
            f"feature weights {path} not found; train them with `python scripts/train_shapes_features.py`"
        )
    net = ShapesFeatureNet()
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.eval().requires_grad_(False)


def _update(metric, images: list, real: bool, batch_size: int) -> None:
    for start in range(0, len(images), batch_size):
        metric.update(to_uint8_batch(images[start:start + batch_size]), real=real)


@torch.no_grad()
def fid(real: list, fake: list, net: ShapesFeatureNet | None = None, batch_size: int = 256) -> float:
    """Fréchet distance between the shapes-feature statistics of two image lists."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise PixforgeError(f"FID needs at least 2 images per side; got {len(real)} real, {len(fake)} fake")
    metric = FrechetInceptionDistance(feature=net or load_feature_net(), reset_real_features=True)
    _update(metric, real, True, batch_size)
    _update(metric, fake, False, batch_size)
    return float(metric.compute())


@torch.no_grad()
def kid(real: list, fake: list, net: ShapesFeatureNet | None = None, subset_size: int = 50,
        subsets: int = 100, batch_size: int = 256) -> tuple[float, float]:
    """(mean, std) kernel distance (polynomial kernel, unbiased MMD²) over random subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise PixforgeError(f"KID needs at least 2 images per side; got {len(real)} real, {len(fake)} fake")
    metric = KernelInceptionDistance(feature=net or load_feature_net(), subsets=subsets, subset_size=size)
    _update(metric, real, True, batch_size)
    _update(metric, fake, False, batch_size)
    mean, std = metric.compute()
    return float(mean), float(std)
