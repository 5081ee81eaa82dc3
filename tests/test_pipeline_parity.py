"""PixArtPipeline vs diffusers' PixArtAlphaPipeline / PixArtSigmaPipeline on identical tiny random components.

The same folder is loaded by both; the same seeds, prompts, negative prompts and sizes go
in. Images (in [0, 1]) must agree to 1e-4 absolute. Latents are compared relative to
their size: a random transformer does not predict the noise, so its final latents are
x_T / sqrt(ᾱ_999) ≈ 150x the unit noise, where float32 itself only resolves ~3e-5.
"""
import json

import numpy as np
import pytest
import torch
from helpers.tiny_pipeline import build_diffusers_pipeline, run_diffusers

from pixforge.sampling.pipeline import PixArtPipeline

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle", "two blue squares above a yellow star"]
NEGATIVES = ["", "green"]
IMAGE_TOLERANCE = 1e-4
LATENT_RELATIVE_TOLERANCE = 1e-5


def assert_same_generation(ours, images, latents):
    assert ours.images.shape == images.shape
    assert ours.latents.shape == latents.shape
    assert np.abs(ours.images - images).max() <= IMAGE_TOLERANCE
    assert images.std() > 0.05  # a real image, not a constant
    scale = latents.abs().max().item()
    assert (ours.latents - latents).abs().max().item() <= LATENT_RELATIVE_TOLERANCE * max(1.0, scale)


def generate_both(tmp_path, kind, scheduler, height, width, steps, guidance=4.5, per_prompt=1, seed=7,
                  **transformer_overrides):
    reference = build_diffusers_pipeline(kind, scheduler, **transformer_overrides)
    reference.save_pretrained(tmp_path / "model")
    seeds = [seed + i for i in range(len(PROMPTS) * per_prompt)]
    images, latents = run_diffusers(reference, PROMPTS, NEGATIVES, height, width, steps, guidance, seeds, per_prompt)
    pipe = PixArtPipeline.from_pretrained(tmp_path / "model")
    ours = pipe(PROMPTS, NEGATIVES, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                seed=seed, num_images_per_prompt=per_prompt, output_type="np", progress=False,
                max_sequence_length=16)
    return ours, images, latents


def test_alpha_with_micro_conditions_matches_diffusers_at_a_non_square_size(tmp_path):
    # diffusers passes micro-conditions only when sample_size == 128: such a tiny model uses them.
    ours, images, latents = generate_both(tmp_path, "alpha", "dpm++", 64, 128, 20, per_prompt=2, sample_size=128)
    assert PixArtPipeline.from_pretrained(tmp_path / "model").transformer.config.uses_micro_conditions
    assert ours.seeds == [7, 8, 9, 10]
    assert_same_generation(ours, images, latents)


@pytest.mark.parametrize(
    "kind,scheduler,steps",
    [("sigma", "dpm++", 20), ("sigma", "ddim", 10), ("alpha", "euler", 10), ("sigma", "euler-a", 8), ("alpha", "lcm", 4)],
)
def test_each_sampler_matches_the_diffusers_pipeline(tmp_path, kind, scheduler, steps):
    ours, images, latents = generate_both(tmp_path, kind, scheduler, 128, 128, steps)
    assert ours.metadata[0].sampler == scheduler
    assert_same_generation(ours, images, latents)


def test_guidance_one_skips_the_unconditional_branch_like_diffusers(tmp_path):
    ours, images, latents = generate_both(tmp_path, "sigma", "dpm++", 128, 128, 6, guidance=1.0)
    assert_same_generation(ours, images, latents)


def test_a_named_sampler_overrides_the_folder_scheduler(tmp_path):
    # The folder ships DPM-Solver++; asking for euler must equal diffusers' Euler pipeline.
    reference = build_diffusers_pipeline("sigma", "euler")
    images, latents = run_diffusers(reference, PROMPTS, NEGATIVES, 128, 128, 6, 4.5, [3, 4])
    reference.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(reference.scheduler.config)
    reference.save_pretrained(tmp_path / "model")
    pipe = PixArtPipeline.from_pretrained(tmp_path / "model")
    ours = pipe(PROMPTS, NEGATIVES, height=128, width=128, num_inference_steps=6, sampler="euler", seed=3,
                output_type="np", progress=False, max_sequence_length=16)
    assert_same_generation(ours, images, latents)


def test_a_folder_we_save_loads_in_diffusers_and_generates_the_same_image(tmp_path):
    build_diffusers_pipeline("sigma", "dpm++").save_pretrained(tmp_path / "original")
    pipe = PixArtPipeline.from_pretrained(tmp_path / "original")
    pipe.save_pretrained(tmp_path / "resaved")
    index = json.loads((tmp_path / "resaved" / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    reference = diffusers.PixArtSigmaPipeline.from_pretrained(tmp_path / "resaved")
    reference.set_progress_bar_config(disable=True)
    assert type(reference.scheduler).__name__ == "DPMSolverMultistepScheduler"
    images, latents = run_diffusers(reference, PROMPTS, NEGATIVES, 128, 128, 8, 4.5, [5, 6])
    ours = pipe(PROMPTS, NEGATIVES, height=128, width=128, num_inference_steps=8, seed=5, output_type="np",
                progress=False, max_sequence_length=16)
    assert_same_generation(ours, images, latents)


def test_pil_output_equals_diffusers_pil_output(tmp_path):
    reference = build_diffusers_pipeline("alpha", "dpm++")
    reference.save_pretrained(tmp_path / "model")
    expected = reference(PROMPTS[0], height=128, width=128, num_inference_steps=5,
                         generator=torch.Generator().manual_seed(11), use_resolution_binning=False,
                         clean_caption=False, max_sequence_length=16).images[0]
    ours = PixArtPipeline.from_pretrained(tmp_path / "model")(
        PROMPTS[0], height=128, width=128, num_inference_steps=5, seed=11, progress=False, max_sequence_length=16
    )
    assert ours.images[0].size == (128, 128)
    ours_pixels, expected_pixels = np.asarray(ours.images[0]).astype(int), np.asarray(expected).astype(int)
    # The same 8-bit rounding; a value within 1e-6 of a .5 boundary may round the other way.
    assert np.abs(ours_pixels - expected_pixels).max() <= 1
    assert (ours_pixels == expected_pixels).mean() > 0.999


def test_a_diffusers_adapter_sampler_matches_that_scheduler_in_diffusers(tmp_path):
    # "unipc" is driven by diffusers' own UniPCMultistepScheduler, configured with PixArt's betas.
    reference = build_diffusers_pipeline("sigma", "dpm++")
    reference.save_pretrained(tmp_path / "model")
    reference.scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0,
    )
    images, latents = run_diffusers(reference, PROMPTS, NEGATIVES, 128, 128, 6, 4.5, [1, 2])
    ours = PixArtPipeline.from_pretrained(tmp_path / "model")(
        PROMPTS, NEGATIVES, height=128, width=128, num_inference_steps=6, sampler="unipc", seed=1,
        output_type="np", progress=False, max_sequence_length=16,
    )
    assert ours.metadata[0].sampler == "unipc"
    assert_same_generation(ours, images, latents)
