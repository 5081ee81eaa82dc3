"""Analytic parameter and FLOP counts for a transformer config (2 FLOPs per multiply-add)."""
from __future__ import annotations

import torch

from pixforge.models.presets import TransformerConfig


def count_parameters(config: TransformerConfig) -> int:
    """Parameters of a model with this config, counted on the meta device (no memory)."""
    from pixforge.models.transformer import PixArtTransformer

    with torch.device("meta"):
        model = PixArtTransformer(config)
    return sum(p.numel() for p in model.parameters())


def forward_flops(
    config: TransformerConfig,
    height: int,
    width: int,
    text_tokens: int = 120,
    batch: int = 1,
    vae_scale_factor: int = 8,
) -> dict[str, float]:
    """FLOPs of one forward at an image size in pixels, split by component.

    `total` counts everything; `total_cached_text` leaves out the caption projection and
    the cross-attention K/V, which a generation computes once rather than every step.
    """
    d = config.inner_dim
    p = config.patch_size
    n = (height // vae_scale_factor // p) * (width // vae_scale_factor // p)  # image tokens
    layers = config.num_layers
    length = text_tokens

    def mm(rows, inner, cols):  # one (rows x inner) @ (inner x cols) product
        return 2.0 * rows * inner * cols

    compressed = set(config.kv_compress_layers)
    s2 = config.kv_compress_scale**2
    self_scores = sum(
        2 * mm(n, d, n // s2 if i in compressed else n) for i in range(layers)
    )  # QK^T and AV
    parts = {
        "patch_embed": mm(n, config.in_channels * p * p, d),
        "self_attn_proj": layers * 4 * mm(n, d, d),
        "self_attn_scores": self_scores,
        "cross_attn_q_out": layers * 2 * mm(n, d, d),
        "cross_attn_kv": layers * 2 * mm(length, d, d),
        "cross_attn_scores": layers * 2 * mm(n, d, length),
        "feed_forward": layers * 2 * mm(n, d, 4 * d),
        "caption_projection": 0.0 if config.caption_channels is None else (
            mm(length, config.caption_channels, d) + mm(length, d, d)
        ),
        "final_layer": mm(n, d, p * p * config.output_channels),
        "condition": mm(1, 256, d) + mm(1, d, d) + mm(1, d, 6 * d),
    }
    parts = {k: v * batch for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    parts["total_cached_text"] = parts["total"] - parts["cross_attn_kv"] - parts["caption_projection"]
    parts["tokens"] = float(n)
    return parts
