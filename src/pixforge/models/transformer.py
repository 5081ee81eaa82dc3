"""The PixArt diffusion transformer (α and Σ) in one file.

Layout and math follow the original PixArt code and diffusers' `PixArtTransformer2DModel`
(tested at parity on identical weights), with exact speedups that change no output:
- the text side of cross-attention (caption projection + per-block K/V) is computed once
  per generation (`prepare_text`) and reused at every denoising step;
- fused QKV (self-attention) and fused KV (cross-attention) projections;
- `F.scaled_dot_product_attention`;
- the patch embedding as one GEMM over flattened patches instead of a strided conv;
- `condition_table`: all steps' timestep conditions in one batched call per generation.
`set_exact_speedups(False)` selects the plain path the tests compare against.

Shapes: B batch, N image tokens, L text tokens, D hidden size, H heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixforge.errors import PixforgeError
from pixforge.models.presets import TransformerConfig

# diffusers turns padding into an additive bias of -10000 rather than removing the tokens;
# we keep the same constant so outputs match to float precision.
MASK_BIAS = -10000.0


# ------------------------------------------------------------------------------------
# Embedding helpers (pure functions)
# ------------------------------------------------------------------------------------
def timestep_sinusoid(timesteps: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim) as cat[cos, sin] (diffusers' flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) float64 positions -> (M, dim): dim/2 sines then dim/2 cosines."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    angles = torch.outer(positions.reshape(-1).to(torch.float64), omega)  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float) -> torch.Tensor:
    """2-D sin-cos positional embedding for a grid_h x grid_w token grid -> (grid_h*grid_w, dim).

    Each axis spans [0, base_size / interpolation_scale) whatever its length (PixArt's
    multi-aspect trick); the first half of the channels encodes the column (x), the
    second half the row (y); tokens are in row-major order.
    """
    if dim % 4:
        raise PixforgeError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos embedding")
    ys = torch.arange(grid_h, dtype=torch.float32) / (grid_h / base_size) / interpolation_scale
    xs = torch.arange(grid_w, dtype=torch.float32) / (grid_w / base_size) / interpolation_scale
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    emb = torch.cat([sincos_1d(dim // 2, grid_x), sincos_1d(dim // 2, grid_y)], dim=1)
    return emb.float()


# ------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------
class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (diffusers' TimestepEmbedding, keys linear_1/linear_2)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Timestep (+ optional resolution / aspect-ratio micro-conditions) -> (B, D)."""

    def __init__(self, dim: int, micro_conditions: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.micro_conditions = micro_conditions
        if micro_conditions:
            self.resolution_embedder = MLPEmbedder(256, dim // 3)
            self.aspect_ratio_embedder = MLPEmbedder(256, dim // 3)

    def forward(self, timestep, resolution, aspect_ratio, dtype) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_sinusoid(timestep).to(dtype))  # (B, D)
        if not self.micro_conditions:
            return emb
        batch = timestep.shape[0]
        size_emb = self.resolution_embedder(timestep_sinusoid(resolution.flatten()).to(dtype))  # (2B, D/3)
        ar_emb = self.aspect_ratio_embedder(timestep_sinusoid(aspect_ratio.flatten()).to(dtype))  # (B, D/3)
        return emb + torch.cat([size_emb.reshape(batch, -1), ar_emb.reshape(batch, -1)], dim=1)


class AdaLNSingle(nn.Module):
    """adaLN-single: one condition MLP shared by all blocks -> 6 modulation vectors."""

    def __init__(self, dim: int, micro_conditions: bool):
        super().__init__()
        self.emb = ConditionEmbedder(dim, micro_conditions)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, timestep, resolution, aspect_ratio, dtype):
        embedded = self.emb(timestep, resolution, aspect_ratio, dtype)  # (B, D)
        return self.linear(F.silu(embedded)), embedded  # (B, 6D), (B, D)


class CaptionProjection(nn.Module):
    """Text encoder features -> model width: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(caption), approximate="tanh"))


# bf16 CPU attention runs in query chunks whose score block (B, H, chunk, Nk) holds at most this
# many elements (4 MB in bf16): 64 queries for XL/2 at 512² (B 2, H 16, Nk 1024), all 256 for B/2
# at 256² (measured 2-4% faster per forward there than 64-query chunks).
ATTENTION_SCORE_BUDGET = 2**21
ATTENTION_QUERY_CHUNK = 64  # the smallest chunk


def attention(q, k, v, bias, use_sdpa: bool) -> torch.Tensor:
    """(B, H, Nq, d), (B, H, Nk, d) x2, additive bias broadcastable to (B, H, Nq, Nk) or None."""
    if not use_sdpa:
        scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        if bias is not None:
            scores = scores + bias
        return scores.softmax(dim=-1) @ v
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # PyTorch's CPU flash-attention kernel runs bf16 at its fp32 speed (measured: 56 ms for
        # XL/2 self-attention at 512², the same as fp32, 41% of the whole bf16 forward), while
        # bf16 GEMMs run ~4x faster than fp32 on CPUs with bf16 units: query-chunked attention
        # on bf16 matmuls takes 30 ms for the same work.
        return chunked_attention(q, k, v, bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def chunked_attention(q, k, v, bias, chunk: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v, `chunk` queries at a time (default: as many as
    fit ATTENTION_SCORE_BUDGET, at least ATTENTION_QUERY_CHUNK)."""
    if chunk is None:
        batch, heads, keys = q.shape[0], q.shape[1], k.shape[-2]
        chunk = max(ATTENTION_QUERY_CHUNK, ATTENTION_SCORE_BUDGET // max(batch * heads * keys, 1))
    scale = q.shape[-1] ** -0.5
    # Heads split out of a fused projection are strided views: one copy each here, instead of
    # one inside every chunk's matmul.
    # The scale goes on q (Nq x d values) rather than on the scores (Nq x Nk).
    q, v = (q * scale).contiguous(), v.contiguous()
    keys_t = k.contiguous().transpose(-2, -1)  # (B, H, d, Nk)
    outputs = []
    for start in range(0, q.shape[-2], chunk):
        scores = torch.matmul(q[:, :, start:start + chunk], keys_t)  # (B, H, c, Nk)
        if bias is not None:
            scores = scores + bias
        outputs.append(torch.matmul(scores.softmax(dim=-1), v))  # (B, H, c, d)
    return torch.cat(outputs, dim=2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection and optional Σ KV compression."""

    def __init__(self, dim: int, heads: int, bias: bool, qk_norm: bool, kv_compress_scale: int, kv_compress_mode: str):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.to_out = nn.Linear(dim, dim)
        # Σ: LayerNorm over the full width (not per head), before the head split.
        self.q_norm = nn.LayerNorm(dim) if qk_norm else None
        self.k_norm = nn.LayerNorm(dim) if qk_norm else None
        self.kv_compress_scale = kv_compress_scale
        self.kv_compress_mode = kv_compress_mode
        if kv_compress_scale > 1 and kv_compress_mode == "conv":
            s = kv_compress_scale
            self.kv_compress = nn.Conv2d(dim, dim, kernel_size=s, stride=s, groups=dim)
            self.kv_compress_norm = nn.LayerNorm(dim)
            # "Conv Avg Init": starts as an s x s average pool, so a converted α model still works.
            nn.init.constant_(self.kv_compress.weight, 1.0 / s**2)
            nn.init.zeros_(self.kv_compress.bias)
        self.fused = True
        self.use_sdpa = True

    def project_qkv(self, x: torch.Tensor):
        if self.fused:
            return self.to_qkv(x).chunk(3, dim=-1)
        w, b = self.to_qkv.weight, self.to_qkv.bias
        dim = x.shape[-1]
        return tuple(
            F.linear(x, w[i * dim:(i + 1) * dim], None if b is None else b[i * dim:(i + 1) * dim]) for i in range(3)
        )

    def compress(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """(B, N, D) on an h x w grid -> (B, N / s^2, D)."""
        batch, _, dim = tokens.shape
        h, w = grid_hw
        s = self.kv_compress_scale
        if h % s or w % s:
            raise PixforgeError(f"KV compression by {s} needs a token grid divisible by {s}, got {h}x{w}")
        grid = tokens.transpose(1, 2).reshape(batch, dim, h, w)  # (B, D, h, w)
        if self.kv_compress_mode == "conv":
            grid = self.kv_compress(grid)
            return self.kv_compress_norm(grid.flatten(2).transpose(1, 2))
        if self.kv_compress_mode == "ave":  # the original code's 'ave' is nearest-neighbour interpolation
            grid = F.interpolate(grid, scale_factor=1.0 / s, mode="nearest")
        else:  # "uniform": strided slice
            grid = grid[:, :, ::s, ::s]
        return grid.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        return self.to_out(self.attend(*self.project_qkv(x), grid_hw))

    def attend(self, q, k, v, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Projected q, k, v (B, N, D) each -> the attention output before `to_out`, (B, N, D)."""
        batch, tokens, dim = q.shape
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.kv_compress_scale > 1:
            k, v = self.compress(k, grid_hw), self.compress(v, grid_hw)  # (B, N', D)
        head_dim = dim // self.heads
        q = q.reshape(batch, -1, self.heads, head_dim).transpose(1, 2)  # (B, H, N, d)
        k = k.reshape(batch, -1, self.heads, head_dim).transpose(1, 2)  # (B, H, N', d)
        v = v.reshape(batch, -1, self.heads, head_dim).transpose(1, 2)
        out = attention(q, k, v, None, self.use_sdpa)  # (B, H, N, d)
        return out.transpose(1, 2).reshape(batch, tokens, dim)


class CrossAttention(nn.Module):
    """Image tokens attend to text tokens; text K/V come precomputed from `text_kv`."""

    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=bias)
        self.to_out = nn.Linear(dim, dim)
        self.fused = True
        self.use_sdpa = True

    def text_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) projected caption -> K, V as (B, H, L, d)."""
        batch, length, dim = text.shape
        if self.fused:
            k, v = self.to_kv(text).chunk(2, dim=-1)
        else:
            w, b = self.to_kv.weight, self.to_kv.bias
            k = F.linear(text, w[:dim], None if b is None else b[:dim])
            v = F.linear(text, w[dim:], None if b is None else b[dim:])
        head_dim = dim // self.heads
        k = k.reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.to_out(self.attend(self.to_q(x), k, v, bias))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Projected queries (B, N, D) and text K/V -> the attention output before `to_out`, (B, N, D)."""
        batch, tokens, dim = q.shape
        q = q.reshape(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)  # (B, H, N, d)
        if k.shape[0] != batch:  # one prompt's K/V shared by several images
            repeat = batch // k.shape[0]
            k, v = k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)
            bias = None if bias is None else bias.repeat_interleave(repeat, 0)
        out = attention(q, k, v, bias, self.use_sdpa)
        return out.transpose(1, 2).reshape(batch, tokens, dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift in one pass over x (shift/scale are (B, 1, D))."""
    return torch.addcmul(shift, x, 1 + scale)


class PixArtBlock(nn.Module):
    """adaLN-single modulated self-attention, ungated cross-attention, modulated MLP."""

    def __init__(self, config: TransformerConfig, index: int):
        super().__init__()
        dim, heads = config.inner_dim, config.num_attention_heads
        compress = config.kv_compress_scale if index in config.kv_compress_layers else 1
        self.norm_eps = config.norm_eps
        self.attn1 = SelfAttention(
            dim, heads, config.attention_bias, config.qk_norm, compress, config.kv_compress_mode
        )
        self.attn2 = CrossAttention(dim, heads, config.attention_bias)
        self.ff = FeedForward(dim, 4 * dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.norm_eps)

    def modulation(self, t_mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, 1, D)."""
        batch, dim = t_mod.shape[0], self.scale_shift_table.shape[-1]
        mod = self.scale_shift_table[None] + t_mod.reshape(batch, 6, dim)  # (B, 6, D)
        return mod.chunk(6, dim=1)

    # The three components, each returning its output before the adaLN gate (what feature
    # caches store: a reused output is still gated by the current timestep).
    def self_attention(self, x, shift, scale, grid_hw) -> torch.Tensor:
        return self.attn1(modulate(self.norm(x), shift, scale), grid_hw)

    def cross_attention(self, x, text_k, text_v, text_bias) -> torch.Tensor:
        return self.attn2(x, text_k, text_v, text_bias)  # PixArt: no norm, no gate here

    def feed_forward(self, x, shift, scale) -> torch.Tensor:
        return self.ff(modulate(self.norm(x), shift, scale))

    def forward(self, x, t_mod, grid_hw, text_k, text_v, text_bias) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t_mod)
        x = torch.addcmul(x, gate_msa, self.self_attention(x, shift_msa, scale_msa, grid_hw))
        x = x + self.cross_attention(x, text_k, text_v, text_bias)
        x = torch.addcmul(x, gate_mlp, self.feed_forward(x, shift_mlp, scale_mlp))
        return x


@dataclass
class TextContext:
    """Everything the transformer needs from the prompt, computed once per generation.

    kv: per block (K, V), each (B, H, L, d); bias: (B, 1, 1, L) additive mask or None.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    bias: torch.Tensor | None

    @property
    def batch_size(self) -> int:
        return self.kv[0][0].shape[0]


class PixArtTransformer(nn.Module):
    """PixArt-α / PixArt-Σ diffusion transformer.

    forward(latents (B, C, h, w), timestep (B,), text (B, L, caption_channels),
            text_mask (B, L)) -> (B, out_channels, h, w); with learned sigma the first
    C output channels are ε and the last C the variance interpolation, as in diffusers.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        dim, patch = config.inner_dim, config.patch_size
        self.pos_embed = nn.Module()
        self.pos_embed.proj = nn.Conv2d(config.in_channels, dim, kernel_size=patch, stride=patch)
        self.adaln_single = AdaLNSingle(dim, config.uses_micro_conditions)
        self.caption_projection = (
            CaptionProjection(config.caption_channels, dim) if config.caption_channels is not None else None
        )
        self.transformer_blocks = nn.ModuleList(PixArtBlock(config, i) for i in range(config.num_layers))
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, patch * patch * config.output_channels)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.patch_as_linear = True

    # --- construction ----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "PixArtTransformer":
        """Load a diffusers folder, a single .safetensors, or an original PixArt .pth."""
        from pixforge.models.convert import load_transformer

        return load_transformer(path, **kwargs)

    def save_pretrained(self, directory, max_shard_size: int | None = None) -> None:
        """Write a diffusers `transformer/` folder (config.json + safetensors)."""
        from pixforge.models.convert import save_transformer

        save_transformer(self, directory, max_shard_size=max_shard_size)

    def initialize_weights(self) -> "PixArtTransformer":
        """PixArt's training initialisation (xavier linears, zeroed cross-attn output and final layer)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        weight = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        for embedder in (self.adaln_single.emb.timestep_embedder,):
            nn.init.normal_(embedder.linear_1.weight, std=0.02)
            nn.init.normal_(embedder.linear_2.weight, std=0.02)
        nn.init.normal_(self.adaln_single.linear.weight, std=0.02)
        if self.caption_projection is not None:
            nn.init.normal_(self.caption_projection.linear_1.weight, std=0.02)
            nn.init.normal_(self.caption_projection.linear_2.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.attn2.to_out.weight)
            nn.init.zeros_(block.attn2.to_out.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        return self

    def set_exact_speedups(self, enabled: bool = True) -> "PixArtTransformer":
        """Toggle fused projections and SDPA (the plain path exists for parity tests)."""
        for module in self.modules():
            if isinstance(module, (SelfAttention, CrossAttention)):
                module.fused = enabled
                module.use_sdpa = enabled
        self.patch_as_linear = enabled
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    # --- pieces of the forward pass ---------------------------------------------------
    def positional_embedding(self, grid_h: int, grid_w: int, device, dtype) -> torch.Tensor:
        """(1, grid_h*grid_w, D), computed once per grid size, device and dtype."""
        key = (grid_h, grid_w, str(device), dtype)
        cached = self._pos_cache.get(key)
        if cached is None:
            c = self.config
            emb = sincos_2d(c.inner_dim, grid_h, grid_w, c.base_grid_size, c.resolved_interpolation_scale)
            cached = emb.to(device=device, dtype=dtype)[None]
            self._pos_cache[key] = cached
        return cached

    def prepare_text(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> TextContext:
        """Caption projection + every block's cross-attention K/V: once per generation.

        text: (B, L, caption_channels); text_mask: (B, L) with 1 for real tokens.
        """
        if self.caption_projection is not None:
            if text.shape[-1] != self.config.caption_channels:
                raise PixforgeError(
                    f"text embeddings have {text.shape[-1]} channels; this model expects "
                    f"caption_channels={self.config.caption_channels}"
                )
            text = self.caption_projection(text.to(self.dtype))  # (B, L, D)
        bias = None
        if text_mask is not None:
            if text_mask.shape != text.shape[:2]:
                raise PixforgeError(f"text mask shape {tuple(text_mask.shape)} != text shape {tuple(text.shape[:2])}")
            bias = ((1 - text_mask.to(text.dtype)) * MASK_BIAS)[:, None, None, :]  # (B, 1, 1, L)
        kv = [block.attn2.text_kv(text) for block in self.transformer_blocks]
        return TextContext(kv=kv, bias=bias)

    def prepare_condition(self, timestep, batch: int, resolution=None, aspect_ratio=None):
        """Timestep (+ micro-conditions) -> (t_mod (B, 6D), t_emb (B, D))."""
        timestep = torch.as_tensor(timestep, device=self.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if self.config.uses_micro_conditions:
            if resolution is None or aspect_ratio is None:
                raise PixforgeError("this model uses micro-conditions: pass resolution (B, 2) and aspect_ratio (B, 1)")
            resolution = torch.as_tensor(resolution, device=self.device, dtype=torch.float32).reshape(batch, 2)
            aspect_ratio = torch.as_tensor(aspect_ratio, device=self.device, dtype=torch.float32).reshape(batch, 1)
        return self.adaln_single(timestep, resolution, aspect_ratio, self.dtype)

    def condition_table(self, timesteps: torch.Tensor, resolution=None, aspect_ratio=None) -> dict:
        """Every sampling step's condition in one batched call: {float(t): (t_mod (1, 6D), t_emb (1, D))}.

        A generation's steps share everything but the timestep, and the timesteps are known
        before the first step, so the sinusoid + MLPs run once (one GEMM of S rows) instead of
        once per step. resolution (1, 2) / aspect_ratio (1, 1) when the model uses micro-conditions.
        """
        steps = timesteps.reshape(-1).to(self.device)
        if self.config.uses_micro_conditions and resolution is not None and aspect_ratio is not None:
            resolution = torch.as_tensor(resolution, dtype=torch.float32).reshape(1, 2).expand(len(steps), 2)
            aspect_ratio = torch.as_tensor(aspect_ratio, dtype=torch.float32).reshape(1, 1).expand(len(steps), 1)
        t_mod, t_emb = self.prepare_condition(steps, len(steps), resolution, aspect_ratio)
        return {float(t): (t_mod[i:i + 1], t_emb[i:i + 1]) for i, t in enumerate(steps.cpu().tolist())}

    def embed(self, latents: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, h, w) -> tokens (B, N, D) with positions, and the token grid size."""
        patch = self.config.patch_size
        height, width = latents.shape[-2:]
        if height % patch or width % patch:
            raise PixforgeError(f"latent size {height}x{width} is not divisible by the patch size {patch}")
        grid = (height // patch, width // patch)
        proj, latents = self.pos_embed.proj, latents.to(self.dtype)
        if self.patch_as_linear:
            # A conv whose stride equals its kernel is a matmul over the flattened patches: one
            # copy to (B, N, C·p·p) and one GEMM, 2.2-14x faster than oneDNN's strided conv here
            # (docs/benchmarks.md), and the tokens come out contiguous.
            batch, channels = latents.shape[:2]
            patches = latents.reshape(batch, channels, grid[0], patch, grid[1], patch)
            patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, grid[0] * grid[1], channels * patch * patch)
            tokens = F.linear(patches, proj.weight.reshape(proj.weight.shape[0], -1), proj.bias)  # (B, N, D)
        else:
            tokens = proj(latents).flatten(2).transpose(1, 2)  # (B, N, D)
            # The transpose leaves a (B, D, N) memory layout; every later elementwise op would keep
            # it and every Linear / LayerNorm would copy it back. One copy here saves all of those.
            tokens = tokens.contiguous()
        return tokens + self.positional_embedding(*grid, tokens.device, tokens.dtype), grid

    def unpatchify(self, x: torch.Tensor, t_emb: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Final adaLN layer + linear, then (B, N, p*p*C) -> (B, C, h*p, w*p)."""
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)  # (B, 1, D)
        x = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale)
        x = self.proj_out(x)  # (B, N, p*p*C)
        batch, (h, w), p, c = x.shape[0], grid_hw, self.config.patch_size, self.config.output_channels
        x = x.reshape(batch, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(batch, c, h * p, w * p)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        resolution: torch.Tensor | None = None,
        aspect_ratio: torch.Tensor | None = None,
        text_context: TextContext | None = None,
        cache=None,
        condition: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`cache`: a `pixforge.accel.cache.CacheRun` (one per generation; each call is one
        sampling step) that decides per block and component what to compute or reuse.
        `condition`: (t_mod, t_emb) from `prepare_condition` / `condition_table`, computed
        ahead (then `timestep`, `resolution`, `aspect_ratio` are not used); batch 1 broadcasts."""
        if text_context is None:
            if text is None:
                raise PixforgeError("pass either text embeddings or a prepared text_context")
            text_context = self.prepare_text(text, text_mask)
        batch = latents.shape[0]
        if batch % text_context.batch_size:
            raise PixforgeError(
                f"latent batch {batch} is not a multiple of the text batch {text_context.batch_size}"
            )
        x, grid = self.embed(latents)
        if condition is None:
            condition = self.prepare_condition(timestep, batch, resolution, aspect_ratio)
        t_mod, t_emb = condition
        if cache is not None:
            x = cache.run_blocks(self.transformer_blocks, x, t_mod, grid, text_context)
        else:
            for block, (k, v) in zip(self.transformer_blocks, text_context.kv):
                x = block(x, t_mod, grid, k, v, text_context.bias)
        return self.unpatchify(x, t_emb, grid)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
