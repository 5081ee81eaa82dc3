"""Our own AutoencoderKL (the Stable Diffusion / SDXL VAE PixArt decodes with).

State-dict keys are exactly diffusers' `AutoencoderKL` keys, and `VAEConfig` reads the
fields of diffusers' `vae/config.json`, so a diffusers `vae/` folder loads as is and
`save_pretrained` writes one diffusers loads. Neither diffusers nor transformers is
imported: on these machines `from diffusers import AutoencoderKL` alone costs ~4 s.

Layout (f = 2^(len(block_out_channels) - 1), the spatial factor):
  encode: image (B, 3, H, W) → Encoder → (B, 2·latent, H/f, W/f) → quant_conv → mean, logvar
  decode: latent (B, latent, H/f, W/f) → post_quant_conv → Decoder → image (B, 3, H, W)
Large latents decode in overlapping tiles blended linearly (diffusers' tiled_decode).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixforge.errors import CheckpointError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
BIN_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
# Written into config.json for diffusers' loader (it only compares it to warn).
DIFFUSERS_VERSION_WRITTEN = "0.30.0"
ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish, "relu": nn.ReLU}


@dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' AutoencoderKL `config.json` that define this model."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def __post_init__(self):
        # JSON lists → tuples, so the config stays hashable and compares by value.
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        problems = []
        if any(kind != "DownEncoderBlock2D" for kind in self.down_block_types):
            problems.append(f"down_block_types={list(self.down_block_types)} (only DownEncoderBlock2D)")
        if any(kind != "UpDecoderBlock2D" for kind in self.up_block_types):
            problems.append(f"up_block_types={list(self.up_block_types)} (only UpDecoderBlock2D)")
        if not len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels):
            problems.append("down_block_types, up_block_types and block_out_channels must have one entry per level")
        if self.act_fn not in ACTIVATIONS:
            problems.append(f"act_fn={self.act_fn!r} (choose one of {', '.join(ACTIVATIONS)})")
        if any(channels % self.norm_num_groups for channels in self.block_out_channels):
            problems.append(
                f"block_out_channels={list(self.block_out_channels)} must be divisible by "
                f"norm_num_groups={self.norm_num_groups}"
            )
        if problems:
            raise CheckpointError("unsupported VAE config: " + "; ".join(problems))

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: dict) -> "VAEConfig":
        """From a diffusers config.json dict; keys it does not use (`_class_name`, ...) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in known})

    def to_dict(self) -> dict:
        config = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION_WRITTEN}
        for key, value in asdict(self).items():
            config[key] = list(value) if isinstance(value, tuple) else value
        return config


# ----------------------------------------------------------------------------- blocks
class ResnetBlock2D(nn.Module):
    """GroupNorm → act → conv → GroupNorm → act → conv, plus a (1×1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = ACTIVATIONS[act_fn]()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) → (B, Cout, H, W)
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv with diffusers' asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest ×2 then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the H·W positions, with GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' `to_out.0`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)  # a channels-last view
        # h first: the sum (and every conv after it) stays channels-last, as in diffusers,
        # which picks the same conv kernels and so the same rounding.
        return h + x


class MidBlock(nn.Module):
    """resnet → attention → resnet at the lowest resolution (diffusers' UNetMidBlock2D)."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, act_fn) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups, act = config.block_out_channels, config.norm_num_groups, config.act_fn
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, act, downsample=i < len(channels) - 1
            )
            for i in range(len(channels))
        )
        self.mid_block = MidBlock(channels[-1], groups, act, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_act = ACTIVATIONS[act]()
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) → (B, 2·latent, H/f, W/f)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = tuple(reversed(config.block_out_channels))
        groups, act = config.norm_num_groups, config.act_fn
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, act, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups, act, upsample=i < len(channels) - 1
            )
            for i in range(len(channels))
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_act = ACTIVATIONS[act]()
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, latent, h, w) → (B, 3, h·f, w·f)
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


@dataclass(frozen=True, eq=False)
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element."""

    mean: torch.Tensor  # (B, latent, h, w)
    logvar: torch.Tensor  # (B, latent, h, w), clamped to [-30, 20] like diffusers

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


# ----------------------------------------------------------------------------- model
class AutoencoderKL(nn.Module):
    """Encoder + decoder with diffusers' AutoencoderKL parameter names."""

    def __init__(self, config: VAEConfig, auto_tile_above: int = 128):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent2 = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(latent2, latent2, 1) if config.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv2d(config.latent_channels, config.latent_channels, 1) if config.use_post_quant_conv else None
        )
        # decode() tiles on its own when a latent side exceeds this (128 latents = 1024 px at f = 8).
        self.auto_tile_above = auto_tile_above
        self.memory_format = torch.contiguous_format

    def set_channels_last(self, enabled: bool = True) -> "AutoencoderKL":
        """Run the convolutions in channels-last (NHWC) layout: weights and inputs.

        oneDNN's CPU convolutions are faster in NHWC (decode measured 1.27-1.73x faster, from
        the tiny test VAE to an SD-sized one; docs/benchmarks.md). Same math, other kernels:
        outputs differ from the NCHW path by float rounding only (measured: up to 1.3e-4 at
        512² on outputs of magnitude ~5, i.e. 1/30 of one 8-bit level).
        """
        self.memory_format = torch.channels_last if enabled else torch.contiguous_format
        return self.to(memory_format=self.memory_format)

    @property
    def tile_latent_size(self) -> int:
        """Default tile side in latent pixels: diffusers' sample_size / f (64 for the SD VAE)."""
        size = self.config.sample_size
        size = size[0] if isinstance(size, tuple) else size
        return max(int(size / self.config.spatial_factor), 1)

    # --- encode / decode
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image in [-1, 1] (B, 3, H, W) → posterior over latents (B, latent, H/f, W/f)."""
        moments = self.encoder(x.to(self.conv_dtype).contiguous(memory_format=self.memory_format))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor, tile_size: int | None = None, overlap: float = 0.25) -> torch.Tensor:
        """Latent (B, latent, h, w) → image (B, 3, h·f, w·f), roughly in [-1, 1].

        `tile_size` (latent pixels) decodes in overlapping tiles blended linearly over
        `overlap` of a tile; by default tiles of `tile_latent_size` are used only when a
        latent side exceeds `auto_tile_above`.
        """
        z = z.to(self.conv_dtype).contiguous(memory_format=self.memory_format)
        if tile_size is None and max(z.shape[-2:]) > self.auto_tile_above:
            tile_size = self.tile_latent_size
        if tile_size is not None and max(z.shape[-2:]) > tile_size:
            return self._tiled_decode(z, tile_size, overlap)
        return self._decode(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _tiled_decode(self, z: torch.Tensor, tile_size: int, overlap: float) -> torch.Tensor:
        # diffusers' tiled_decode: tiles every tile·(1 − overlap) latents, each blended in place with
        # its (already blended) upper and left neighbours over `blend` pixels, then cropped.
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap={overlap} must be in [0, 1)")
        f = self.config.spatial_factor
        stride = max(int(tile_size * (1 - overlap)), 1)
        blend = int(tile_size * f * overlap)
        keep = tile_size * f - blend
        rows = [
            [self._decode(z[:, :, i : i + tile_size, j : j + tile_size]) for j in range(0, z.shape[3], stride)]
            for i in range(0, z.shape[2], stride)
        ]
        out_rows = []
        for i, row in enumerate(rows):
            out_row = []
            for j, tile in enumerate(row):
                if i > 0:
                    _blend_into(rows[i - 1][j], tile, blend, dim=2)
                if j > 0:
                    _blend_into(row[j - 1], tile, blend, dim=3)
                out_row.append(tile[:, :, :keep, :keep])
            out_rows.append(torch.cat(out_row, dim=3))
        return torch.cat(out_rows, dim=2)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.encode(x).sample(generator))

    @property
    def conv_dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    # --- latent scaling (what the diffusion model sees)
    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent → diffusion latent: (z − shift) · scaling_factor."""
        shift = self.config.shift_factor or 0.0
        return (z - shift) * self.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latent → VAE latent: latents / scaling_factor + shift (diffusers' order)."""
        z = latents / self.config.scaling_factor
        return z + self.config.shift_factor if self.config.shift_factor else z

    # --- checkpoints
    @classmethod
    def from_pretrained(cls, folder, torch_dtype: torch.dtype | None = None) -> "AutoencoderKL":
        """Load a diffusers `vae/` folder (or a pipeline folder holding `vae/`)."""
        from pixforge.models.convert import read_pth, read_safetensors

        folder = Path(folder)
        if (folder / "vae" / CONFIG_NAME).exists():
            folder = folder / "vae"
        if not (folder / CONFIG_NAME).exists():
            raise CheckpointError(f"no {CONFIG_NAME} in {folder}: not a diffusers AutoencoderKL folder")
        try:
            raw = json.loads((folder / CONFIG_NAME).read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{folder / CONFIG_NAME} is not valid JSON: {error}") from error
        if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise CheckpointError(f"{folder} holds a {raw['_class_name']}, not an AutoencoderKL")
        from pixforge.models.convert import skipped_init

        with skipped_init():  # load_diffusers_state_dict below sets every parameter, strictly
            model = cls(VAEConfig.from_dict(raw))
        if (folder / WEIGHTS_NAME).exists():
            state, _ = read_safetensors(folder / WEIGHTS_NAME)
        elif (folder / BIN_WEIGHTS_NAME).exists():
            state = read_pth(folder / BIN_WEIGHTS_NAME)  # torch.load(weights_only=True)
        else:
            raise CheckpointError(f"no weights in {folder}: expected {WEIGHTS_NAME} or {BIN_WEIGHTS_NAME}")
        model.load_diffusers_state_dict(state, source=str(folder))
        if torch_dtype is not None:
            model.to(torch_dtype)
        return model.eval()

    def load_diffusers_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load diffusers-named weights strictly; old attention names (query/key/value/proj_attn) are renamed."""
        from pixforge.models.convert import state_dict_mismatch

        state = rename_deprecated_attention_keys(state)
        missing, unexpected, wrong_shape = state_dict_mismatch(self.state_dict(), state)
        missing, unexpected = sorted(missing), sorted(unexpected)
        wrong_shape = [f"{key} {got} (expected {want})" for key, got, want in sorted(wrong_shape)]
        if missing or unexpected or wrong_shape:
            parts = []
            if missing:
                parts.append(f"missing keys: {_short_list(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {_short_list(unexpected)}")
            if wrong_shape:
                parts.append(f"mismatched shapes: {_short_list(wrong_shape)}")
            raise CheckpointError(f"{source} does not match the VAE config: " + "; ".join(parts))
        self.load_state_dict(state, strict=True)

    def save_pretrained(self, folder) -> None:
        """Write config.json + diffusion_pytorch_model.safetensors (atomic) for diffusers to load."""
        from pixforge.models.convert import atomic_save_safetensors, atomic_write_bytes

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(self.state_dict(), folder / WEIGHTS_NAME, metadata={"format": "pt"})
        atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(self.config.to_dict(), indent=2) + "\n").encode())


def _blend_into(previous: torch.Tensor, tile: torch.Tensor, blend: int, dim: int) -> None:
    """Ramp `tile`'s first `blend` rows (dim 2) or columns (dim 3) from `previous`'s last ones, in place."""
    blend = min(previous.shape[dim], tile.shape[dim], blend)
    if blend == 0:
        return
    ramp = torch.arange(blend, dtype=torch.float64) / blend  # y / blend, as diffusers computes it
    shape = (1, 1, blend, 1) if dim == 2 else (1, 1, 1, blend)
    weight = ramp.to(tile.dtype).view(shape)
    keep = (1 - ramp).to(tile.dtype).view(shape)
    head = tile.narrow(dim, 0, blend)
    head.copy_(previous.narrow(dim, previous.shape[dim] - blend, blend) * keep + head * weight)


def rename_deprecated_attention_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older VAE checkpoints name the mid-block attention query/key/value/proj_attn."""
    renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for key, value in state.items():
        if ".attentions." in key:
            for old, new in renames.items():
                key = key.replace(old, new)
        out[key] = value
    return out


def _short_list(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


__all__ = ["VAEConfig", "AutoencoderKL", "DiagonalGaussian", "rename_deprecated_attention_keys"]
