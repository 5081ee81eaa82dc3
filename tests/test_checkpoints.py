"""Every weight format loads, round-trips with diffusers, and bad files fail safely."""
import json
import os
import pickle

import pytest
import torch

from pixforge.errors import CheckpointError
from pixforge.models.convert import (
    diffusers_to_original,
    pixforge_to_diffusers,
    save_single_file,
)
from pixforge.models.presets import get_preset
from pixforge.models.transformer import PixArtTransformer
from helpers.tiny_transformer import random_transformer as random_model

diffusers = pytest.importorskip("diffusers")




def inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900]), torch.randn(2, 5, 32, generator=g)


def ours_out(model):
    latents, t, text = inputs()
    with torch.no_grad():
        return model(latents, t, text)


def diffusers_out(model):
    latents, t, text = inputs()
    with torch.no_grad():
        return model(latents, encoder_hidden_states=text, timestep=t, return_dict=False)[0]


def test_ours_saved_loads_in_diffusers_with_the_same_output(tmp_path):
    ours = random_model()
    ours.save_pretrained(tmp_path / "transformer")
    reference = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    assert (diffusers_out(reference) - ours_out(ours)).abs().max().item() <= 1e-5


def test_diffusers_saved_loads_in_ours_with_the_same_output(tmp_path):
    torch.manual_seed(0)
    reference = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=24, cross_attention_dim=48, caption_channels=32,
        num_layers=2, sample_size=16, patch_size=2, out_channels=8,
    ).eval()
    reference.save_pretrained(tmp_path / "transformer")
    ours = PixArtTransformer.from_pretrained(tmp_path / "transformer")
    assert ours.config.num_layers == 2 and ours.config.caption_channels == 32
    assert (diffusers_out(reference) - ours_out(ours)).abs().max().item() <= 1e-5


def test_a_pipeline_folder_loads_its_transformer_subfolder(tmp_path):
    ours = random_model()
    ours.save_pretrained(tmp_path / "pipe" / "transformer")
    loaded = PixArtTransformer.from_pretrained(tmp_path / "pipe")
    assert torch.equal(ours_out(loaded), ours_out(ours))


def test_sharded_folder_round_trips(tmp_path):
    ours = random_model()
    ours.save_pretrained(tmp_path / "sharded", max_shard_size=40_000)
    files = sorted(os.listdir(tmp_path / "sharded"))
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    reference = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "sharded").eval()
    assert (diffusers_out(reference) - ours_out(ours)).abs().max().item() <= 1e-5
    assert torch.equal(ours_out(PixArtTransformer.from_pretrained(tmp_path / "sharded")), ours_out(ours))


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_single_safetensors_file_loads_in_either_layout(tmp_path, layout):
    ours = random_model()
    path = tmp_path / f"model_{layout}.safetensors"
    save_single_file(ours, path, layout=layout)
    assert torch.equal(ours_out(PixArtTransformer.from_pretrained(path)), ours_out(ours))


def test_bare_single_file_without_config_loads_with_a_preset(tmp_path):
    from safetensors.torch import save_file

    ours = random_model()
    save_file({k: v.contiguous() for k, v in pixforge_to_diffusers(ours.state_dict()).items()}, tmp_path / "bare.safetensors")
    loaded = PixArtTransformer.from_pretrained(tmp_path / "bare.safetensors", config="tiny")
    assert torch.equal(ours_out(loaded), ours_out(ours))


def original_state(model):
    """An original-layout PixArt state dict, as the official training code saves it."""
    state = diffusers_to_original(pixforge_to_diffusers(model.state_dict()))
    tokens = model.config.base_grid_size**2
    state["pos_embed"] = torch.zeros(1, tokens, model.config.inner_dim)  # dropped: recomputed
    state["y_embedder.y_embedding"] = torch.randn(7, 32)  # the CFG null-token buffer: dropped
    return state


def test_original_pth_with_state_dict_key_loads_and_matches(tmp_path):
    ours = random_model(use_additional_conditions=False)
    state = original_state(ours)
    assert "blocks.0.attn.qkv.weight" in state and state["blocks.0.attn.qkv.weight"].shape == (144, 48)
    assert "blocks.1.cross_attn.kv_linear.weight" in state and "t_block.1.weight" in state
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "PixArt-tiny.pth")
    loaded = PixArtTransformer.from_pretrained(tmp_path / "PixArt-tiny.pth", config="tiny")
    assert torch.equal(ours_out(loaded), ours_out(ours))


def test_original_pth_prefers_ema_weights(tmp_path):
    ours = random_model()
    other = random_model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    torch.save({"state_dict": original_state(other), "state_dict_ema": original_state(ours)}, tmp_path / "train.pth")
    loaded = PixArtTransformer.from_pretrained(tmp_path / "train.pth", config="tiny")
    assert torch.equal(ours_out(loaded), ours_out(ours))


def test_original_sigma_checkpoint_with_kv_compression_and_qk_norm_round_trips(tmp_path):
    config = dict(kv_compress_layers=(1,), qk_norm=True)
    ours = random_model(**config)
    state = original_state(ours)
    assert "blocks.1.attn.sr.weight" in state and "blocks.0.attn.q_norm.weight" in state
    torch.save({"state_dict": state}, tmp_path / "sigma.pth")
    loaded = PixArtTransformer.from_pretrained(tmp_path / "sigma.pth", config=get_preset("tiny").replace(**config))
    assert torch.equal(ours_out(loaded), ours_out(ours))
    # and the config is inferred from the weights when none is given
    inferred = PixArtTransformer.from_pretrained(tmp_path / "sigma.pth")
    assert inferred.config.kv_compress_layers == (1,) and inferred.config.qk_norm


def test_micro_condition_weights_map_to_resolution_and_aspect_embedders(tmp_path):
    ours = random_model(use_additional_conditions=True)
    state = original_state(ours)
    assert "csize_embedder.mlp.0.weight" in state and "ar_embedder.mlp.2.bias" in state
    torch.save({"state_dict": state}, tmp_path / "ms.pth")
    loaded = PixArtTransformer.from_pretrained(tmp_path / "ms.pth", config=ours.config)
    for name in ("resolution_embedder", "aspect_ratio_embedder"):
        a = getattr(loaded.adaln_single.emb, name).linear_1.weight
        b = getattr(ours.adaln_single.emb, name).linear_1.weight
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- bad files
def test_truncated_safetensors_fails_with_a_clear_message(tmp_path):
    random_model().save_pretrained(tmp_path / "t")
    weights = tmp_path / "t" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        PixArtTransformer.from_pretrained(tmp_path / "t")


def test_truncated_pth_fails_with_a_clear_message(tmp_path):
    torch.save({"state_dict": original_state(random_model())}, tmp_path / "m.pth")
    data = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "m.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        PixArtTransformer.from_pretrained(tmp_path / "m.pth", config="tiny")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_with_code_is_refused_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"state_dict": {"x": _Payload()}}, handle)
    with pytest.raises(CheckpointError, match="refusing to load"):
        PixArtTransformer.from_pretrained(tmp_path / "evil.pth", config="tiny")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_wrong_shapes_name_the_keys_and_the_fitting_preset(tmp_path):
    random_model().save_pretrained(tmp_path / "t")
    with pytest.raises(CheckpointError) as error:
        PixArtTransformer.from_pretrained(tmp_path / "t", config="S/2")
    message = str(error.value)
    assert "mis-shaped" in message and "pos_embed.proj.weight" in message
    assert "presets that fit these weights: tiny" in message


def test_missing_keys_are_named_in_diffusers_terms(tmp_path):
    from safetensors.torch import load_file, save_file

    random_model().save_pretrained(tmp_path / "t")
    weights = tmp_path / "t" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["transformer_blocks.1.ff.net.2.weight"]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"missing keys: transformer_blocks\.1\.ff\.net\.2\.weight"):
        PixArtTransformer.from_pretrained(tmp_path / "t")


def test_partial_qkv_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    random_model().save_pretrained(tmp_path / "t")
    weights = tmp_path / "t" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["transformer_blocks.0.attn1.to_v.weight"]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match="missing"):
        PixArtTransformer.from_pretrained(tmp_path / "t")


def test_not_a_pixart_checkpoint_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a PixArt transformer checkpoint"):
        PixArtTransformer.from_pretrained(tmp_path / "other.safetensors")


def test_invalid_config_json_is_reported(tmp_path):
    random_model().save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        PixArtTransformer.from_pretrained(tmp_path / "t")


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    random_model().save_pretrained(tmp_path / "t")
    assert sorted(os.listdir(tmp_path / "t")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["_class_name"] == "PixArtTransformer2DModel"


def test_skipped_init_builds_without_filling_and_restores_torch_init():
    from pixforge.models.convert import skipped_init

    marker = torch.full((3, 3), 7.0)
    with skipped_init():
        assert torch.nn.init.zeros_(marker) is marker and bool((marker == 7).all())  # left as it is
        torch.nn.Linear(4, 4)  # builds (on torch.empty memory)
    assert bool((torch.nn.init.zeros_(marker) == 0).all())  # restored
    with pytest.raises(RuntimeError, match="inside"):
        with skipped_init():
            raise RuntimeError("inside")
    assert bool((torch.nn.init.ones_(marker) == 1).all())  # restored after an error too


def test_a_loaded_model_is_the_checkpoint_whatever_the_random_state(tmp_path):
    """Loading skips the random init: every parameter must come from the file."""
    model = random_model()
    model.save_pretrained(tmp_path / "m")
    for seed in (0, 1):
        torch.manual_seed(seed)
        loaded = PixArtTransformer.from_pretrained(tmp_path / "m")
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name
