"""Transformer configuration: one frozen dataclass whose fields map 1:1 onto diffusers'
`PixArtTransformer2DModel` config.json, plus a dict of named presets.

The Σ extensions (KV token compression, qk-norm) are extra fields with defaults that
reproduce the α model; diffusers ignores them when it reads our config.json.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from pixforge.errors import CheckpointError, PixforgeError

logger = logging.getLogger(__name__)

# Fields diffusers' config.json may carry that do not change the PixArt architecture
# (older `Transformer2DModel` files, deprecated arguments). Read and dropped.
_IGNORED_DIFFUSERS_FIELDS = {
    "num_vector_embeds",
    "use_linear_projection",
    "only_cross_attention",
    "double_self_attention",
    "caption_projection_dim",
    "num_embeds_ada_norm_single",
}

# pixforge-only fields (written to config.json; diffusers warns and ignores them).
_EXTENSION_FIELDS = ("kv_compress_layers", "kv_compress_scale", "kv_compress_mode", "qk_norm")
KV_COMPRESS_MODES = ("conv", "ave", "uniform")


@dataclass(frozen=True)
class TransformerConfig:
    """PixArt-α/Σ transformer hyper-parameters (diffusers' names and defaults)."""

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = 8
    num_layers: int = 28
    dropout: float = 0.0
    norm_num_groups: int = 32
    cross_attention_dim: int | None = 1152
    attention_bias: bool = True
    sample_size: int = 128
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int | None = 1000
    upcast_attention: bool = False
    norm_type: str = "ada_norm_single"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    use_additional_conditions: bool | None = None
    caption_channels: int | None = None
    attention_type: str = "default"
    # --- PixArt-Σ extensions -------------------------------------------------------
    kv_compress_layers: tuple[int, ...] = field(default_factory=tuple)
    kv_compress_scale: int = 2
    kv_compress_mode: str = "conv"
    qk_norm: bool = False

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so the config stays hashable and frozen.
        object.__setattr__(self, "kv_compress_layers", tuple(int(i) for i in self.kv_compress_layers))
        problems = []
        if self.norm_type != "ada_norm_single":
            problems.append(f"norm_type={self.norm_type!r} (PixArt uses 'ada_norm_single')")
        if self.activation_fn != "gelu-approximate":
            problems.append(f"activation_fn={self.activation_fn!r} (PixArt uses 'gelu-approximate')")
        if self.norm_elementwise_affine:
            problems.append("norm_elementwise_affine=True (PixArt's norms have no affine parameters)")
        if self.attention_type != "default":
            problems.append(f"attention_type={self.attention_type!r} (only 'default' is supported)")
        if self.cross_attention_dim is not None and self.cross_attention_dim != self.inner_dim:
            problems.append(
                f"cross_attention_dim={self.cross_attention_dim} must equal heads x head_dim = {self.inner_dim}"
            )
        if self.uses_micro_conditions and self.inner_dim % 3:
            problems.append(f"micro-conditions need a hidden size divisible by 3, got {self.inner_dim}")
        if self.patch_size < 1 or self.num_layers < 1 or self.num_attention_heads < 1:
            problems.append("patch_size, num_layers and num_attention_heads must be >= 1")
        bad_layers = [i for i in self.kv_compress_layers if not 0 <= i < self.num_layers]
        if bad_layers:
            problems.append(f"kv_compress_layers {bad_layers} outside 0..{self.num_layers - 1}")
        if self.kv_compress_layers and self.kv_compress_scale < 2:
            problems.append(f"kv_compress_scale={self.kv_compress_scale} must be >= 2 when layers are compressed")
        if self.kv_compress_mode not in KV_COMPRESS_MODES:
            problems.append(f"kv_compress_mode={self.kv_compress_mode!r} not in {KV_COMPRESS_MODES}")
        if problems:
            raise PixforgeError("invalid transformer config: " + "; ".join(problems))

    # --- derived values (never stored) ---------------------------------------------
    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def learned_sigma(self) -> bool:
        return self.output_channels == 2 * self.in_channels

    @property
    def uses_micro_conditions(self) -> bool:
        # diffusers' rule for configs that leave the field out.
        if self.use_additional_conditions is None:
            return self.sample_size == 128
        return bool(self.use_additional_conditions)

    @property
    def resolved_interpolation_scale(self) -> float:
        if self.interpolation_scale is None:
            return max(self.sample_size // 64, 1)
        return self.interpolation_scale

    @property
    def base_grid_size(self) -> int:
        """Grid side (in tokens) that the positional embedding's range is defined on."""
        return self.sample_size // self.patch_size

    # --- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["kv_compress_layers"] = list(self.kv_compress_layers)
        return data

    def to_diffusers_dict(self) -> dict:
        """config.json content diffusers can read (extensions included, it ignores them)."""
        data = {"_class_name": "PixArtTransformer2DModel", "_diffusers_version": "0.42.1"}
        data.update(self.to_dict())
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TransformerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key.startswith("_") or key in _IGNORED_DIFFUSERS_FIELDS:
                continue
            if key in names:
                kwargs[key] = value
            else:
                unknown.append(key)
        if unknown:
            logger.warning("ignoring unknown transformer config fields: %s", ", ".join(sorted(unknown)))
        try:
            return cls(**kwargs)
        except TypeError as error:  # wrong value types from a hand-edited file
            raise CheckpointError(f"transformer config.json is not valid: {error}") from error

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


def _xl(**overrides) -> TransformerConfig:
    """The published PixArt-XL/2 layout (hidden 1152 = 16 heads x 72, 28 layers, T5-XXL)."""
    base = dict(
        num_attention_heads=16, attention_head_dim=72, num_layers=28, in_channels=4, out_channels=8,
        patch_size=2, caption_channels=4096, cross_attention_dim=1152,
    )
    base.update(overrides)
    return TransformerConfig(**base)


def _dit(hidden: int, depth: int, heads: int) -> TransformerConfig:
    """A DiT-sized PixArt-α (T5-XXL captions) at 256² (latent 32²)."""
    return TransformerConfig(
        num_attention_heads=heads, attention_head_dim=hidden // heads, num_layers=depth,
        cross_attention_dim=hidden, caption_channels=4096, sample_size=32, patch_size=2,
        in_channels=4, out_channels=8, use_additional_conditions=False,
    )


PRESETS: dict[str, TransformerConfig] = {
    # Tests: ~0.2M parameters, same numbers as the tiny diffusers fixture.
    "tiny": TransformerConfig(
        num_attention_heads=2, attention_head_dim=24, num_layers=2, cross_attention_dim=48,
        caption_channels=32, sample_size=16, patch_size=2, in_channels=4, out_channels=8,
        use_additional_conditions=False,
    ),
    # DiT family sizes (Peebles & Xie, Table 1).
    "S/2": _dit(384, 12, 6),
    "B/2": _dit(768, 12, 12),
    "L/2": _dit(1024, 24, 16),
    "XL/2": _dit(1152, 28, 16),
    # Published checkpoints (see shared PIXART_FACTS.md §1 for the evidence per field).
    "pixart-alpha-256": _xl(sample_size=32),
    "pixart-alpha-512": _xl(sample_size=64),
    "pixart-alpha-1024-ms": _xl(sample_size=128),
    "pixart-sigma-256": _xl(sample_size=32, interpolation_scale=0.5),
    "pixart-sigma-512-ms": _xl(sample_size=64, interpolation_scale=1),
    "pixart-sigma-1024-ms": _xl(sample_size=128, interpolation_scale=2, use_additional_conditions=False),
    "pixart-sigma-2k-ms": _xl(sample_size=256, interpolation_scale=4, use_additional_conditions=False),
    # The Σ KV-compression training config (no released weights): conv, scale 2, layers 14..27.
    "pixart-sigma-1024-ms-kvcompress": _xl(
        sample_size=128, interpolation_scale=2, use_additional_conditions=False,
        kv_compress_layers=tuple(range(14, 28)), kv_compress_scale=2, kv_compress_mode="conv",
    ),
}



def _shapes(hidden: int, depth: int, heads: int) -> TransformerConfig:
    """PixArt-α layout for the shapes world: 128² images (16² latents), 384-d MiniLM captions."""
    return TransformerConfig(
        num_attention_heads=heads, attention_head_dim=hidden // heads, num_layers=depth,
        cross_attention_dim=hidden, caption_channels=384, sample_size=16, patch_size=2,
        in_channels=4, out_channels=8, use_additional_conditions=False,
    )


# Sizes for the embedded default model and its tests (MiniLM text encoder).
PRESETS.update({
    "shapes-tiny": _shapes(48, 2, 2),
    "shapes-4m": _shapes(192, 6, 3),
    "shapes-10m": _shapes(256, 10, 4),
    "shapes-25m": _shapes(384, 12, 6),
})

# Hugging Face repository names of the published checkpoints, as aliases.
PRESET_ALIASES = {
    "PixArt-XL-2-256x256": "pixart-alpha-256",
    "PixArt-XL-2-512x512": "pixart-alpha-512",
    "PixArt-XL-2-1024-MS": "pixart-alpha-1024-ms",
    "PixArt-LCM-XL-2-1024-MS": "pixart-alpha-1024-ms",
    "PixArt-Sigma-XL-2-256x256": "pixart-sigma-256",
    "PixArt-Sigma-XL-2-512-MS": "pixart-sigma-512-ms",
    "PixArt-Sigma-XL-2-1024-MS": "pixart-sigma-1024-ms",
    "PixArt-Sigma-XL-2-2K-MS": "pixart-sigma-2k-ms",
}


def preset_names() -> list[str]:
    return [*PRESETS, *PRESET_ALIASES]


def get_preset(name: str) -> TransformerConfig:
    """Return the named preset (case-insensitive; HF repo names accepted as aliases)."""
    lookup = {key.lower(): key for key in PRESETS}
    lookup.update({alias.lower(): target for alias, target in PRESET_ALIASES.items()})
    key = lookup.get(name.lower())
    if key is None:
        raise PixforgeError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return PRESETS[key]
