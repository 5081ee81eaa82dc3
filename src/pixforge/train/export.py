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
    from pixforge.train.data import indices_by_bucket, render_images

    values = []
    device = next(vae.parameters()).device
    for members in indices_by_bucket(dataset.buckets[:count]).values():
        for start in range(0, len(members), batch):
            images = render_images(dataset, members[start:start + batch])
            values.append(vae.encode(images.to(device)).mode().flatten())
    return torch.cat(values).float().std().item()


def export_vae(vae, folder: Path, dataset, keep_scaling: bool = False) -> None:
    """Save with scaling_factor = 1 / std(latents), as Stable Diffusion chose 0.18215
    (`keep_scaling`: keep the VAE's own, for a decoder fine-tuned on a frozen encoder)."""
    vae = vae.float().eval()
    std = 1.0 / vae.config.scaling_factor if keep_scaling else latent_std(vae, dataset)
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
        model.float().eval().cpu(), AutoencoderKL.from_pretrained(config.vae), encoder,
        max_sequence_length=config.max_text_tokens, model_name=Path(config.output_dir).name,
    )
    pipe.prediction_type = config.prediction_type
    pipe.save_pretrained(folder)


def model_from_run(run_dir: str | Path, ema: bool = True):
    """The (EMA) model of a run's newest checkpoint, for evaluating a run while it trains.

    Returns an AutoencoderKL for a VAE run, a PixArtTransformer for a transformer run.
    """
    model, step, _ = model_and_config_from_run(run_dir, ema)
    return model, step


def model_and_config_from_run(run_dir: str | Path, ema: bool = True, checkpoint: str | Path | None = None):
    """(model, step, TrainConfig) of a run's newest checkpoint (or of `checkpoint`), read once."""
    from pixforge.errors import CheckpointError
    from pixforge.train import checkpoint as ckpt
    from pixforge.train.config import TrainConfig
    from pixforge.train.loop import VAEObjective, build_transformer, build_vae

    latest = Path(checkpoint) if checkpoint is not None else ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise CheckpointError(f"{run_dir} has no training checkpoint yet")
    tensors, _, state = ckpt.load_checkpoint(latest)
    config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["full_config"].items()})
    weights = tensors["ema" if ema else "model"]
    if config.target == "vae":
        model = VAEObjective(build_vae(config), config.kl_weight, config.freeze_encoder)
        model.load_state_dict(weights)
        return model.vae.eval(), state["step"], config
    caption_channels = weights["caption_projection.linear_1.weight"].shape[1]
    model = build_transformer(config, caption_channels)
    model.load_state_dict(weights)
    return model.eval(), state["step"], config


@torch.no_grad()
def sample_grid(transformer, vae, encoder, config, path: Path, seed: int = 0) -> Path:
    """One image per fixed prompt (EMA weights, 20 dpm++ steps, CFG 4.5) in a row, PNG."""
    from PIL import Image

    from pixforge.sampling.pipeline import PixArtPipeline

    was_training = transformer.training
    pipe = PixArtPipeline(transformer.eval(), vae, encoder, max_sequence_length=config.max_text_tokens)
    pipe.prediction_type = config.prediction_type
    images = pipe(list(config.sample_prompts), height=config.resolution, width=config.resolution,
                  seed=seed, progress=False).images
    transformer.train(was_training)
    grid = Image.new("RGB", (config.resolution * len(images), config.resolution), "white")
    for index, image in enumerate(images):
        grid.paste(image, (index * config.resolution, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path


@torch.no_grad()
def package_pipeline(run_dir: str | Path, destination: str | Path, dtype: torch.dtype = torch.float16,
                     name: str | None = None, guidance_scale: float | None = None, vae: str | None = None) -> Path:
    """A shippable pipeline folder from a transformer run: its newest checkpoint's EMA weights
    and the VAE it was trained on, stored in `dtype` (fp16 by default: 10 mantissa bits, and
    these weights are far inside its range); they load back into float32 modules. `vae`
    replaces the run's VAE folder (a decoder fine-tuned on the same frozen encoder)."""
    from pixforge.models.vae import AutoencoderKL
    from pixforge.sampling.pipeline import PixArtPipeline
    from pixforge.train.loop import build_text_encoder

    transformer, step, config = model_and_config_from_run(run_dir)
    if config.target != "transformer":
        from pixforge.errors import PixforgeError

        raise PixforgeError(f"{run_dir} trains a {config.target}; package a transformer run")
    encoder = build_text_encoder(config.text_encoder, config.max_text_tokens)
    vae = AutoencoderKL.from_pretrained(vae or config.vae)
    pipe = PixArtPipeline(
        transformer.to(dtype), vae.to(dtype), encoder, max_sequence_length=config.max_text_tokens,
        model_name=name or f"{Path(config.output_dir).name}-step{step}",
    )
    pipe.prediction_type = config.prediction_type
    if guidance_scale is not None:
        pipe.guidance_scale = guidance_scale
    folder = pipe.save_pretrained(destination)
    logger.info("packaged step %d of %s into %s (%s)", step, run_dir, folder, dtype)
    return folder


def main() -> None:
    """python -m pixforge.train.export RUN DEST [--dtype fp16|bf16|fp32] [--name N] [--cfg G]"""
    import argparse

    parser = argparse.ArgumentParser(description=package_pipeline.__doc__)
    parser.add_argument("run")
    parser.add_argument("destination")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--name", default=None)
    parser.add_argument("--cfg", type=float, default=None, help="default guidance scale stored with the model")
    parser.add_argument("--vae", default=None, help="VAE folder to ship instead of the run's (same latents)")
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(package_pipeline(args.run, args.destination, dtype, args.name, args.cfg, args.vae))


if __name__ == "__main__":
    main()
