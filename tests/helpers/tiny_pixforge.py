"""A tiny random pixforge-format pipeline (tiny transformer + tiny VAE + the embedded MiniLM),
as tests/test_pipeline.py builds it: no diffusers, no transformers, ~1 s to build.

    pipe = build_tiny_pixforge_pipeline()      # native 128², size multiple 16
    pipe.save_pretrained(folder)               # a folder `pixforge serve --model` loads
"""
from __future__ import annotations

import torch

from helpers.tiny_pipeline import TINY_VAE


def build_tiny_pixforge_pipeline(seed: int = 0, model_name: str = "tiny-test", max_length: int = 16):
    from pixforge.models.presets import get_preset
    from pixforge.models.text import MiniLMTextEncoder
    from pixforge.models.transformer import PixArtTransformer
    from pixforge.models.vae import AutoencoderKL, VAEConfig
    from pixforge.sampling.pipeline import PixArtPipeline

    torch.manual_seed(seed)  # the modules initialise from the global generator
    config = get_preset("tiny").replace(caption_channels=384)  # MiniLM is 384-d
    transformer = PixArtTransformer(config)
    vae = AutoencoderKL(VAEConfig.from_dict(TINY_VAE))
    with torch.no_grad():
        for param in [*transformer.parameters(), *vae.parameters()]:
            param.add_(torch.randn_like(param) * 0.02)
    encoder = MiniLMTextEncoder.from_package(default_max_length=max_length)
    return PixArtPipeline(transformer, vae, encoder, model_name=model_name)
