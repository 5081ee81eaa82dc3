"""Exact speedups, Σ additions, presets and FLOPs of our transformer (no diffusers needed)."""
import pytest
import torch
import torch.nn.functional as F

from pixforge.errors import PixforgeError
from pixforge.models.presets import PRESETS, get_preset
from pixforge.models.transformer import PixArtTransformer
from helpers.tiny_transformer import random_transformer as random_model




def inputs(batch=2, size=16, text_len=6):
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(batch, 4, size, size, generator=g)
    text = torch.randn(batch, text_len, 32, generator=g)
    mask = torch.ones(batch, text_len)
    mask[-1, 3:] = 0
    return latents, torch.tensor([700, 20][:batch]), text, mask


def test_fused_projections_and_sdpa_equal_the_plain_path():
    model = random_model()
    latents, t, text, mask = inputs()
    with torch.no_grad():
        fast = model(latents, t, text, mask)
        plain = model.set_exact_speedups(False)(latents, t, text, mask)
    assert (fast - plain).abs().max().item() <= 1e-6


def test_patch_embedding_as_one_gemm_equals_the_strided_conv():
    model = random_model()
    latents = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(5))  # non-square grid
    fast, grid = model.embed(latents)
    model.patch_as_linear = False
    conv, conv_grid = model.embed(latents)
    assert grid == conv_grid == (8, 6)
    assert fast.is_contiguous() and fast.shape == conv.shape
    assert (fast - conv).abs().max().item() <= 1e-6


@pytest.mark.parametrize("micro", [False, True])
def test_condition_table_equals_per_step_conditions_and_broadcasts_over_the_batch(micro):
    model = random_model(use_additional_conditions=micro) if micro else random_model()
    latents, _, text, mask = inputs()
    resolution = torch.tensor([[128.0, 96.0]]) if micro else None
    aspect = torch.tensor([[128.0 / 96.0]]) if micro else None
    steps = torch.tensor([999.0, 750.5, 20.0])
    with torch.no_grad():
        table = model.condition_table(steps, resolution, aspect)
        assert sorted(table) == [20.0, 750.5, 999.0]
        for step in steps.tolist():
            t_mod, t_emb = model.prepare_condition(
                torch.tensor([step, step]), 2,
                None if resolution is None else resolution.expand(2, 2), None if aspect is None else aspect.expand(2, 1),
            )
            assert table[step][0].shape[0] == 1
            assert (table[step][0] - t_mod).abs().max().item() <= 1e-6
            assert (table[step][1] - t_emb).abs().max().item() <= 1e-6
            kwargs = dict(resolution=resolution.expand(2, 2), aspect_ratio=aspect.expand(2, 1)) if micro else {}
            looked_up = model(latents, None, text, mask, condition=table[step])
            computed = model(latents, torch.tensor([step, step]), text, mask, **kwargs)
            assert (looked_up - computed).abs().max().item() <= 1e-6


def test_text_context_prepared_once_equals_recomputing_it_every_step():
    model = random_model()
    latents, _, text, mask = inputs()
    with torch.no_grad():
        context = model.prepare_text(text, mask)
        for step in (999, 500, 1):
            t = torch.tensor([step, step])
            cached = model(latents, t, text_context=context)
            fresh = model(latents, t, text, mask)
            assert (cached - fresh).abs().max().item() <= 1e-6


def test_one_prompt_context_serves_several_images_per_prompt():
    model = random_model()
    latents, _, text, mask = inputs(batch=2)
    with torch.no_grad():
        context = model.prepare_text(text[:1], mask[:1])
        shared = model(latents, torch.tensor([5, 5]), text_context=context)
        repeated = model(latents, torch.tensor([5, 5]), text[:1].expand(2, -1, -1), mask[:1].expand(2, -1))
    assert (shared - repeated).abs().max().item() <= 1e-6


def test_bf16_path_stays_close_to_fp32():
    model = random_model()
    latents, t, text, mask = inputs()
    with torch.no_grad():
        reference = model(latents, t, text, mask)
        low = model.to(torch.bfloat16)(latents, t, text, mask).float()
    relative = (low - reference).norm() / reference.norm()
    assert relative.item() < 3e-2


def test_positional_embedding_is_cached_per_grid_size():
    model = random_model()
    a = model.positional_embedding(8, 8, "cpu", torch.float32)
    assert model.positional_embedding(8, 8, "cpu", torch.float32) is a
    assert model.positional_embedding(8, 12, "cpu", torch.float32).shape == (1, 96, 48)


def test_sigma_without_compression_equals_alpha():
    alpha = random_model()
    sigma = PixArtTransformer(alpha.config.replace(kv_compress_layers=(), qk_norm=False)).eval()
    sigma.load_state_dict(alpha.state_dict())
    latents, t, text, mask = inputs()
    with torch.no_grad():
        assert torch.equal(alpha(latents, t, text, mask), sigma(latents, t, text, mask))


def reference_kv_compress_attention(attn, x, grid_hw, scale):
    """The original AttentionKVCompress math, written out independently (PIXART_FACTS §2)."""
    batch, tokens, dim = x.shape
    q, k, v = F.linear(x, attn.to_qkv.weight, attn.to_qkv.bias).reshape(batch, tokens, 3, dim).unbind(2)
    if attn.q_norm is not None:
        q = F.layer_norm(q, (dim,), attn.q_norm.weight, attn.q_norm.bias, 1e-5)
        k = F.layer_norm(k, (dim,), attn.k_norm.weight, attn.k_norm.bias, 1e-5)

    def down(t):
        h, w = grid_hw
        t = t.reshape(batch, h, w, dim).permute(0, 3, 1, 2)
        t = F.conv2d(t, attn.kv_compress.weight, attn.kv_compress.bias, stride=scale, groups=dim)
        t = t.reshape(batch, dim, -1).permute(0, 2, 1)
        return F.layer_norm(t, (dim,), attn.kv_compress_norm.weight, attn.kv_compress_norm.bias, 1e-5)

    k, v = down(k), down(v)
    heads = attn.heads
    q = q.reshape(batch, tokens, heads, -1).transpose(1, 2)
    k = k.reshape(batch, k.shape[1], heads, -1).transpose(1, 2)
    v = v.reshape(batch, v.shape[1], heads, -1).transpose(1, 2)
    weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return F.linear(out, attn.to_out.weight, attn.to_out.bias)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_kv_compression_matches_the_original_formulation(qk_norm):
    model = random_model(kv_compress_layers=(1,), kv_compress_scale=2, qk_norm=qk_norm)
    attn = model.transformer_blocks[1].attn1
    x = torch.randn(2, 8 * 12, 48)
    with torch.no_grad():
        got = attn(x, (8, 12))
        expected = reference_kv_compress_attention(attn, x, (8, 12), 2)
    assert (got - expected).abs().max().item() <= 1e-5


def test_kv_compression_shrinks_keys_and_runs_end_to_end_on_non_square_grids():
    model = random_model(kv_compress_layers=(0, 1), kv_compress_scale=2)
    assert model.transformer_blocks[0].attn1.kv_compress.weight.shape == (48, 1, 2, 2)
    latents, t, text, mask = inputs()
    with torch.no_grad():
        out = model(latents[:, :, :, :12], t, text, mask)  # 8x6 token grid
    assert out.shape == (2, 8, 16, 12)
    assert torch.isfinite(out).all()


def test_kv_compression_init_is_an_average_pool():
    model = PixArtTransformer(get_preset("tiny").replace(kv_compress_layers=(0,))).eval()
    attn = model.transformer_blocks[0].attn1
    tokens = torch.randn(1, 16, 48)
    with torch.no_grad():
        pooled = F.avg_pool2d(tokens.transpose(1, 2).reshape(1, 48, 4, 4), 2).flatten(2).transpose(1, 2)
        assert (attn.compress(tokens, (4, 4)) - F.layer_norm(pooled, (48,))).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", ["ave", "uniform"])
def test_parameter_free_compression_modes_subsample_the_grid(mode):
    model = random_model(kv_compress_layers=(0,), kv_compress_mode=mode)
    attn = model.transformer_blocks[0].attn1
    tokens = torch.arange(16.0).reshape(1, 16, 1).expand(1, 16, 48)
    out = attn.compress(tokens, (4, 4))
    assert out[0, :, 0].tolist() == [0.0, 2.0, 8.0, 10.0]


def test_kv_compression_rejects_grids_not_divisible_by_the_scale():
    model = random_model(kv_compress_layers=(0,), kv_compress_scale=2)
    latents, t, text, mask = inputs()
    with pytest.raises(PixforgeError, match="divisible by 2"):
        model(latents[:, :, :, :14], t, text, mask)  # 8x7 token grid


def test_published_presets_have_the_documented_numbers():
    xl = get_preset("PixArt-XL-2-1024-MS")
    assert (xl.inner_dim, xl.num_layers, xl.caption_channels, xl.sample_size) == (1152, 28, 4096, 128)
    assert xl.uses_micro_conditions and xl.resolved_interpolation_scale == 2
    assert not get_preset("pixart-sigma-1024-ms").uses_micro_conditions
    assert get_preset("pixart-sigma-256").resolved_interpolation_scale == 0.5
    assert get_preset("pixart-sigma-2k-ms").resolved_interpolation_scale == 4
    assert get_preset("pixart-alpha-512").resolved_interpolation_scale == 1
    assert get_preset("pixart-sigma-1024-ms-kvcompress").kv_compress_layers == tuple(range(14, 28))
    assert {"tiny", "S/2", "B/2", "L/2", "XL/2"} <= set(PRESETS)


def test_xl_parameter_count_matches_the_published_model():
    from pixforge.models.flops import count_parameters

    assert count_parameters(get_preset("pixart-alpha-1024-ms")) == 611_349_152
    assert count_parameters(get_preset("pixart-sigma-1024-ms")) == 610_856_096


def test_unknown_preset_names_the_available_ones():
    with pytest.raises(PixforgeError, match="available: tiny"):
        get_preset("XXL/2")


def test_invalid_config_is_rejected_with_the_field_named():
    with pytest.raises(PixforgeError, match="cross_attention_dim"):
        get_preset("tiny").replace(cross_attention_dim=64)


def test_flops_grow_with_tokens_and_count_attention():
    from pixforge.models.flops import forward_flops

    config = get_preset("XL/2")
    small = forward_flops(config, 256, 256, text_tokens=120, batch=1)
    large = forward_flops(config, 512, 512, text_tokens=120, batch=1)
    assert 4.0 < large["total"] / small["total"] < 5.0  # 4x tokens, attention grows faster
    # DiT-XL/2 at 256² is 118.6 GFLOPs (multiply-adds counted once) without text; PixArt adds cross-attention.
    assert 2 * 118e9 < small["total"] < 2 * 160e9


def test_chunked_bf16_attention_equals_the_formula():
    from pixforge.models.transformer import chunked_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 150, 24, generator=g) for _ in range(3))
    bias = torch.zeros(2, 1, 1, 150)
    bias[0, ..., 100:] = -10000.0
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert (chunked_attention(q, k, v, bias, chunk=64) - expected).abs().max().item() <= 1e-5
    low = chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias.bfloat16()).float()
    assert (low - expected).abs().max().item() < 5e-2
