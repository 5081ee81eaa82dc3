"""Our AutoencoderKL against diffusers' on the same random weights, both ways round."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pixforge.errors import CheckpointError, PixforgeError
from pixforge.models.vae import AutoencoderKL, VAEConfig

TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16],
    norm_num_groups=8,
    latent_channels=4,
    layers_per_block=1,
    sample_size=128,
)
# The SD / SDXL VAE layout (layers_per_block 2, widening channels), narrowed to stay tiny.
SD_LIKE = dict(TINY, block_out_channels=[8, 16, 16, 16], layers_per_block=2, scaling_factor=0.13025)
CONFIGS = {"tiny": TINY, "sd-like": SD_LIKE}


def diffusers_vae(config: dict, seed: int = 0):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    torch.manual_seed(seed)
    model = DiffusersAutoencoderKL(**config).eval()
    with torch.no_grad():  # move GroupNorm affines and biases off their 1/0 init too
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def latents(batch: int = 2, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(2))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_diffusers_vae_folder_loads_and_matches(name, tmp_path):
    reference = diffusers_vae(CONFIGS[name])
    reference.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    x, z = images(), latents()
    with torch.no_grad():
        expected_posterior = reference.encode(x).latent_dist
        posterior = ours.encode(x)
        assert max_diff(posterior.mean, expected_posterior.mean) <= 1e-5
        assert max_diff(posterior.logvar, expected_posterior.logvar) <= 1e-5
        assert max_diff(ours.decode(z), reference.decode(z).sample) <= 1e-5
    assert ours.config.scaling_factor == reference.config.scaling_factor


@pytest.mark.parametrize("name", list(CONFIGS))
def test_our_saved_folder_loads_in_diffusers_and_matches(name, tmp_path):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    ours = AutoencoderKL(VAEConfig.from_dict(CONFIGS[name])).eval()
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    ours.save_pretrained(tmp_path)
    reference = DiffusersAutoencoderKL.from_pretrained(tmp_path).eval()
    x, z = images(), latents()
    with torch.no_grad():
        assert max_diff(ours.encode(x).mean, reference.encode(x).latent_dist.mean) <= 1e-5
        assert max_diff(ours.decode(z), reference.decode(z).sample) <= 1e-5
    for key, value in VAEConfig.from_dict(CONFIGS[name]).to_dict().items():
        if not key.startswith("_"):
            assert reference.config[key] == value or list(reference.config[key]) == value, key


def test_state_dict_keys_and_shapes_are_diffusers_own():
    reference = diffusers_vae(SD_LIKE)
    ours = AutoencoderKL(VAEConfig.from_dict(SD_LIKE))
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in ours.state_dict().items()} == expected


def test_posterior_sample_draws_the_same_noise_as_diffusers(tmp_path):
    reference = diffusers_vae(TINY)
    reference.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    x = images()
    with torch.no_grad():
        expected = reference.encode(x).latent_dist.sample(torch.Generator().manual_seed(5))
        got = ours.encode(x).sample(torch.Generator().manual_seed(5))
        assert max_diff(got, expected) <= 1e-5
        assert torch.equal(ours.encode(x).mode(), ours.encode(x).mean)


def test_bin_weights_load_with_weights_only(tmp_path):
    reference = diffusers_vae(TINY)
    reference.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    ours = AutoencoderKL.from_pretrained(tmp_path)
    with torch.no_grad():
        assert max_diff(ours.decode(latents()), reference.decode(latents()).sample) <= 1e-5


def test_a_pipeline_folder_resolves_to_its_vae_subfolder(tmp_path):
    diffusers_vae(TINY).save_pretrained(tmp_path / "vae")
    assert AutoencoderKL.from_pretrained(tmp_path).config.block_out_channels == (8, 8, 16, 16)


def test_old_attention_key_names_are_renamed_on_load(tmp_path):
    reference = diffusers_vae(TINY)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = {}
    for key, value in reference.state_dict().items():
        for new, old in renames.items():
            key = key.replace(new, old)
        state[key] = value
    assert any(".proj_attn." in key for key in state)
    ours = AutoencoderKL(VAEConfig.from_dict(TINY)).eval()
    ours.load_diffusers_state_dict(state)
    with torch.no_grad():
        assert max_diff(ours.decode(latents()), reference.decode(latents()).sample) <= 1e-5


# ----------------------------------------------------------------------------- errors
def test_missing_and_unexpected_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    diffusers_vae(TINY).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop("decoder.conv_out.bias")
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.conv_out\.bias.*unexpected keys: decoder\.extra\.weight"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_a_config_that_does_not_match_the_weights_names_the_shapes(tmp_path):
    diffusers_vae(TINY).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["latent_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mismatched shapes: .*decoder\.conv_in\.weight \(16, 4, 3, 3\) \(expected \(16, 8, 3, 3\)\)"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_a_folder_without_weights_or_config_is_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        AutoencoderKL.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(CheckpointError, match="no weights in"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_unsupported_block_types_are_rejected_by_name():
    with pytest.raises(PixforgeError, match="AttnDownEncoderBlock2D"):
        VAEConfig.from_dict(dict(TINY, down_block_types=["AttnDownEncoderBlock2D"] * 4))


def test_config_ignores_diffusers_bookkeeping_keys():
    config = VAEConfig.from_dict({**TINY, "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1"})
    assert config.block_out_channels == (8, 8, 16, 16) and config.spatial_factor == 8


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    AutoencoderKL(VAEConfig.from_dict(TINY)).save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]


# ----------------------------------------------------------------------------- tiling
def test_tiled_decode_equals_diffusers_tiled_decode(tmp_path):
    reference = diffusers_vae(TINY)
    reference.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    reference.enable_tiling()
    reference.tile_latent_min_size, reference.tile_sample_min_size = 8, 64
    z = latents(batch=1, size=20)
    with torch.no_grad():
        assert max_diff(ours.decode(z, tile_size=8), reference.decode(z).sample) <= 1e-5


def test_tiled_decode_equals_untiled_for_a_local_decoder():
    """With a decoder that only looks at each latent pixel, tiles + blending must be seamless."""
    model = AutoencoderKL(VAEConfig.from_dict(TINY))
    model._decode = lambda z: F.interpolate(torch.tanh(z[:, :3]), scale_factor=8, mode="nearest")
    z = latents(batch=1, size=37)
    torch.testing.assert_close(model.decode(z, tile_size=12, overlap=0.25), model._decode(z), rtol=0, atol=1e-6)


def test_tiled_decode_stays_close_to_untiled_on_a_tiny_model():
    model = AutoencoderKL(VAEConfig.from_dict(TINY)).eval()
    z, other = latents(batch=1, size=24), torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full, tiled, unrelated = model.decode(z), model.decode(z, tile_size=16), model.decode(other)
    assert tiled.shape == full.shape == (1, 3, 192, 192)
    # A random decoder is far from local and GroupNorm sees per-tile statistics, so tiles are
    # close, not equal: measured here, correlation 0.86 and a third of an unrelated image's distance.
    assert torch.corrcoef(torch.stack([tiled.flatten(), full.flatten()]))[0, 1].item() >= 0.7
    assert (tiled - full).abs().mean().item() <= 0.5 * (unrelated - full).abs().mean().item()
    assert torch.equal(model.decode(z, tile_size=24), full)  # one tile covering it all: untiled


def test_decode_tiles_automatically_above_the_threshold():
    model = AutoencoderKL(VAEConfig.from_dict(TINY), auto_tile_above=12).eval()
    assert model.tile_latent_size == 16  # sample_size 128 / f 8, diffusers' tile
    with torch.no_grad():
        small, large = latents(1, 12), latents(1, 20)
        assert torch.equal(model.decode(small), model._decode(small))
        assert torch.equal(model.decode(large), model.decode(large, tile_size=16))
        assert not torch.equal(model.decode(large), model._decode(large))


# ----------------------------------------------------------------------------- scaling and imports
def test_latent_scaling_round_trips_with_and_without_shift():
    z = latents()
    for shift in (None, 0.0609):
        model = AutoencoderKL(VAEConfig.from_dict(dict(TINY, scaling_factor=0.3611, shift_factor=shift)))
        torch.testing.assert_close(model.unscale_latents(model.scale_latents(z)), z)
    assert torch.equal(model.scale_latents(torch.full((1,), 1.0609)), torch.full((1,), 0.3611))


def test_importing_the_vae_imports_neither_diffusers_nor_transformers(tmp_path):
    code = (
        "import sys, torch\n"
        "from pixforge.models.vae import AutoencoderKL, VAEConfig\n"
        f"m = AutoencoderKL(VAEConfig(block_out_channels=(8, 8), down_block_types=('DownEncoderBlock2D',) * 2,"
        " up_block_types=('UpDecoderBlock2D',) * 2, norm_num_groups=8))\n"
        f"m.save_pretrained({str(tmp_path)!r}); m = AutoencoderKL.from_pretrained({str(tmp_path)!r})\n"
        "m.decode(torch.randn(1, 4, 4, 4))\n"
        "bad = [name for name in ('diffusers', 'transformers') if name in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_channels_last_decodes_and_encodes_like_the_default_layout(tmp_path):
    vae = AutoencoderKL(VAEConfig.from_dict(SD_LIKE)).eval()
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        decoded, encoded = vae.decode(latents()), vae.encode(images()).mean
        vae.set_channels_last()
        assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert max_diff(vae.decode(latents()), decoded) <= 1e-4
        assert max_diff(vae.encode(images()).mean, encoded) <= 1e-4
        vae.save_pretrained(tmp_path)  # channels-last weights still save as plain tensors
        reloaded = AutoencoderKL.from_pretrained(tmp_path).eval()
        assert max_diff(reloaded.decode(latents()), decoded) <= 1e-4
        assert vae.set_channels_last(False).decoder.conv_in.weight.is_contiguous()


def test_vae_gate_flat_artifact_finds_a_spot_the_decoder_paints():
    """benchmarks/vae_gate.py's flat-canvas check: a perfect round trip scores 0; a decoder that
    lights one pixel is caught at that pixel, on every canvas."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "vae_gate.py"
    spec = importlib.util.spec_from_file_location("vae_gate", script)
    gate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gate)

    class Exact:
        def encode(self, x):
            return SimpleNamespace(mode=lambda: x.clone())

        def decode(self, z):
            return z

    class Spot(Exact):
        def decode(self, z):
            out = z.clone()
            out[:, 1, 3, 5] += 0.5  # +63.75 of 255 in green at (y 3, x 5)
            return out

    sizes = [(32, 16), (16, 32)]
    clean = gate.flat_artifact(Exact(), sizes)
    assert clean["max"] == 0 and clean["pixels_over_16"] == 0 and clean["canvases"] == 6
    spotted = gate.flat_artifact(Spot(), sizes)
    assert spotted["worst_at"][:2] == (3, 5)
    assert 63 <= spotted["max"] <= 64
    assert spotted["pixels_over_16"] == 4  # white is clamped at +1: only gray and black show it, on both sizes
