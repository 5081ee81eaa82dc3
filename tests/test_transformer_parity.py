"""Our PixArtTransformer vs diffusers.PixArtTransformer2DModel on identical random weights."""
import pytest
import torch

from pixforge.models.convert import diffusers_to_pixforge
from pixforge.models.presets import TransformerConfig
from pixforge.models.transformer import PixArtTransformer

diffusers = pytest.importorskip("diffusers")

TINY = dict(
    num_attention_heads=2, attention_head_dim=24, cross_attention_dim=48, caption_channels=32,
    num_layers=2, sample_size=16, patch_size=2, out_channels=8, in_channels=4,
)


def make_pair(**overrides):
    """A random diffusers model and ours holding the same weights."""
    torch.manual_seed(0)
    reference = diffusers.PixArtTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # diffusers zero-inits nothing, but make every parameter non-trivial
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    config = TransformerConfig.from_dict(dict(reference.config))
    ours = PixArtTransformer(config).eval()
    ours.load_state_dict(diffusers_to_pixforge(reference.state_dict()))
    return reference, ours


def inputs(batch=2, height=16, width=16, text_len=7, caption_channels=32, padded=True):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, height, width, generator=g)
    timestep = torch.tensor([999, 3, 500, 250][:batch])
    text = torch.randn(batch, text_len, caption_channels, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    if padded:
        mask[0, 4:] = 0  # the first prompt has 4 real tokens
    return latents, timestep, text, mask


def run_reference(reference, latents, timestep, text, mask, micro=None):
    with torch.no_grad():
        return reference(
            latents, encoder_hidden_states=text, timestep=timestep, encoder_attention_mask=mask,
            added_cond_kwargs=micro, return_dict=False,
        )[0]


@pytest.mark.parametrize("height,width", [(16, 16), (16, 24), (24, 8)])
@pytest.mark.parametrize("batch", [1, 3])
def test_alpha_forward_matches_diffusers_for_square_and_non_square_sizes(height, width, batch):
    reference, ours = make_pair()
    latents, timestep, text, mask = inputs(batch=batch, height=height, width=width)
    expected = run_reference(reference, latents, timestep, text, mask)
    with torch.no_grad():
        got = ours(latents, timestep, text, mask)
    assert got.shape == expected.shape == (batch, 8, height, width)
    assert (got - expected).abs().max().item() <= 1e-5


def test_forward_with_micro_conditions_matches_diffusers():
    reference, ours = make_pair(use_additional_conditions=True)
    latents, timestep, text, mask = inputs(batch=2, height=16, width=24)
    resolution = torch.tensor([[128.0, 192.0], [128.0, 192.0]])
    aspect = torch.tensor([[128.0 / 192.0], [128.0 / 192.0]])
    expected = run_reference(
        reference, latents, timestep, text, mask, {"resolution": resolution, "aspect_ratio": aspect}
    )
    with torch.no_grad():
        got = ours(latents, timestep, text, mask, resolution=resolution, aspect_ratio=aspect)
    assert (got - expected).abs().max().item() <= 1e-5


def test_micro_conditions_change_the_output():
    _, ours = make_pair(use_additional_conditions=True)
    latents, timestep, text, mask = inputs(batch=1)
    with torch.no_grad():
        a = ours(latents, timestep, text, mask, resolution=torch.tensor([[128.0, 128.0]]), aspect_ratio=torch.tensor([[1.0]]))
        b = ours(latents, timestep, text, mask, resolution=torch.tensor([[256.0, 128.0]]), aspect_ratio=torch.tensor([[2.0]]))
    assert (a - b).abs().max().item() > 1e-4


def test_sigma_interpolation_scale_matches_diffusers():
    reference, ours = make_pair(interpolation_scale=0.5)
    latents, timestep, text, mask = inputs(batch=2, height=24, width=16)
    expected = run_reference(reference, latents, timestep, text, mask)
    with torch.no_grad():
        got = ours(latents, timestep, text, mask)
    assert (got - expected).abs().max().item() <= 1e-5


def test_padding_mask_is_respected_like_diffusers():
    reference, ours = make_pair()
    latents, timestep, text, mask = inputs(batch=2)
    garbage = text.clone()
    garbage[0, 4:] = 100.0  # padded positions must not matter
    with torch.no_grad():
        a = ours(latents, timestep, text, mask)
        b = ours(latents, timestep, garbage, mask)
    assert (a - b).abs().max().item() <= 1e-5
    assert (b - run_reference(reference, latents, timestep, garbage, mask)).abs().max().item() <= 1e-5


def test_forward_without_mask_matches_diffusers():
    reference, ours = make_pair()
    latents, timestep, text, _ = inputs(batch=2)
    with torch.no_grad():
        expected = reference(latents, encoder_hidden_states=text, timestep=timestep, return_dict=False)[0]
        got = ours(latents, timestep, text)
    assert (got - expected).abs().max().item() <= 1e-5


def test_parameter_count_matches_diffusers():
    reference, ours = make_pair(use_additional_conditions=True)
    assert ours.num_parameters() == sum(p.numel() for p in reference.parameters())
