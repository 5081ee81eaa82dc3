"""Tiny random PixArt pipelines (diffusers components, ~0.25M parameters) for tests and benchmarks.

    pipe = build_diffusers_pipeline("alpha", scheduler="dpm++")   # diffusers.PixArtAlphaPipeline
    pipe.save_pretrained(folder)                                   # a folder pixforge loads

Tiny T5 (32-d, in-memory Unigram tokenizer), tiny AutoencoderKL (8, 8, 16, 16 channels,
factor 8), tiny PixArt transformer (2 heads x 24, 2 layers, out_channels 8). Every
parameter is perturbed, so no output is trivially zero.
"""
from __future__ import annotations

import torch

from helpers.tiny_t5 import TINY_T5_HIDDEN_SIZE, build_tiny_t5

BETAS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}

TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, layers_per_block=1,
    block_out_channels=[8, 8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, sample_size=128,
)

TINY_TRANSFORMER = dict(
    num_attention_heads=2, attention_head_dim=24, cross_attention_dim=48, caption_channels=TINY_T5_HIDDEN_SIZE,
    num_layers=2, sample_size=16, patch_size=2, in_channels=4, out_channels=8,
)


def diffusers_scheduler(name: str):
    """The diffusers scheduler each of our samplers is at parity with (PixArt's betas)."""
    import diffusers

    if name == "dpm++":  # PixArt's shipped scheduler_config.json
        return diffusers.DPMSolverMultistepScheduler(
            **BETAS, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
            euler_at_final=False, timestep_spacing="linspace", steps_offset=0, prediction_type="epsilon",
        )
    if name == "ddim":  # leading spacing: where diffusers' DDIM is right (#12633 breaks linspace)
        return diffusers.DDIMScheduler(**BETAS, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=True)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**BETAS, timestep_spacing="linspace")
    if name == "euler-a":
        return diffusers.EulerAncestralDiscreteScheduler(**BETAS, timestep_spacing="linspace")
    if name == "lcm":  # PixArt-LCM-XL-2-1024-MS
        return diffusers.LCMScheduler(**BETAS, original_inference_steps=50, timestep_scaling=10.0)
    raise KeyError(name)


def _perturb(module: torch.nn.Module, scale: float) -> torch.nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * scale)
    return module.eval()


def build_diffusers_pipeline(kind: str = "alpha", scheduler: str = "dpm++", seed: int = 0, **transformer_overrides):
    """A diffusers PixArtAlphaPipeline ("alpha") or PixArtSigmaPipeline ("sigma") with random weights."""
    import diffusers

    tokenizer, text_encoder = build_tiny_t5(seed)
    torch.manual_seed(seed)
    vae = _perturb(diffusers.AutoencoderKL(**TINY_VAE), 0.02)
    transformer = _perturb(diffusers.PixArtTransformer2DModel(**{**TINY_TRANSFORMER, **transformer_overrides}), 0.05)
    cls = diffusers.PixArtAlphaPipeline if kind == "alpha" else diffusers.PixArtSigmaPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
               scheduler=diffusers_scheduler(scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(pipe, prompts, negative_prompt, height, width, steps, guidance, seeds, per_prompt=1,
                  max_sequence_length=16):
    """-> (images (B, H, W, 3) numpy, final latents (B, C, h, w)); generator i seeded seeds[i]."""
    captured = {}

    def keep_latents(step, t, latents):
        captured["latents"] = latents.clone()

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    images = pipe(
        prompts, negative_prompt=negative_prompt, height=height, width=width, num_inference_steps=steps,
        guidance_scale=guidance, generator=generators, num_images_per_prompt=per_prompt, output_type="np",
        use_resolution_binning=False, clean_caption=False, max_sequence_length=max_sequence_length,
        callback=keep_latents, callback_steps=1,
    ).images
    return images, captured["latents"]
