"""What a finished training run leaves behind: EMA weights in the diffusers layout."""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@torch.no_grad()
def latent_std(vae, dataset, count: int = 256, batch: int = 32) -> float:
    """Standard deviation of the posterior mode over `count` training images."""
    by_size: dict[int, list[int]] = {}
    for index in range(min(count, len(dataset))):
        by_size.setdefault(dataset.buckets[index], []).append(index)
    values = []
    for members in by_size.values():
        for start in range(0, len(members), batch):
            images = torch.stack([dataset[i][0] for i in members[start:start + batch]])
            values.append(vae.encode(images).mode().flatten())
    return torch.cat(values).float().std().item()


def export_vae(vae, folder: Path, dataset) -> None:
    """Save with scaling_factor = 1 / std(latents), as Stable Diffusion chose 0.18215."""
    vae = vae.float().eval()
    std = latent_std(vae, dataset)
    vae.config = dataclasses.replace(vae.config, scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(folder)
    logger.info("VAE saved to %s (latent std %.4f, scaling_factor %.5f)", folder, std, 1.0 / std)


def export_transformer(model, config, folder: Path) -> None:
    """transformer/ (EMA) next to a copy of the VAE it was trained on."""
    model.float().eval().save_pretrained(folder / "transformer")
    vae_target = folder / "vae"
    if vae_target.exists():
        shutil.rmtree(vae_target)
    shutil.copytree(config.vae, vae_target, ignore=shutil.ignore_patterns(".*"))
