"""What a finished training run leaves behind: EMA weights in the diffusers layout."""
from __future__ import annotations

import dataclasses
import logging
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
    """A complete pipeline folder: the EMA transformer, the VAE it was trained on, the
    text encoder it read (MiniLM by reference to its pip package, or T5) and the default
    sampler, loadable with `PixArtPipeline.from_pretrained(folder)`."""
    from pixforge.models.vae import AutoencoderKL
    from pixforge.sampling.pipeline import PixArtPipeline
    from pixforge.train.loop import build_text_encoder

    encoder = build_text_encoder(config.text_encoder, config.max_text_tokens)
    pipe = PixArtPipeline(
        model.float().eval(), AutoencoderKL.from_pretrained(config.vae), encoder,
        max_sequence_length=config.max_text_tokens, model_name=Path(config.output_dir).name,
    )
    pipe.save_pretrained(folder)
