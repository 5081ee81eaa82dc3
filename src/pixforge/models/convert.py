"""Weights in and out of `PixArtTransformer`, in every layout PixArt ships: the one place
with key maps.

Layouts:
- "diffusers": `PixArtTransformer2DModel` names (`transformer_blocks.i.attn1.to_q`, ...);
  what `save_pretrained` writes and what diffusers loads.
- "original": the PixArt repositories' `.pth` names (`blocks.i.attn.qkv`, `t_block.1`, ...).
- "pixforge": our module names (fused `attn1.to_qkv`, `attn2.to_kv`, `ff.fc1`, ...).

Loading never executes code: `.pth` files go through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from pixforge.errors import CheckpointError
from pixforge.models.presets import PRESETS, TransformerConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

# --------------------------------------------------------------------------------------
# original PixArt .pth  <->  diffusers
# --------------------------------------------------------------------------------------
# Non-block keys: original prefix -> diffusers prefix (PIXART_FACTS §3, diffusers' converter).
_ORIGINAL_TOP = {
    "x_embedder.proj.": "pos_embed.proj.",
    "t_embedder.mlp.0.": "adaln_single.emb.timestep_embedder.linear_1.",
    "t_embedder.mlp.2.": "adaln_single.emb.timestep_embedder.linear_2.",
    "t_block.1.": "adaln_single.linear.",
    "y_embedder.y_proj.fc1.": "caption_projection.linear_1.",
    "y_embedder.y_proj.fc2.": "caption_projection.linear_2.",
    "csize_embedder.mlp.0.": "adaln_single.emb.resolution_embedder.linear_1.",
    "csize_embedder.mlp.2.": "adaln_single.emb.resolution_embedder.linear_2.",
    "ar_embedder.mlp.0.": "adaln_single.emb.aspect_ratio_embedder.linear_1.",
    "ar_embedder.mlp.2.": "adaln_single.emb.aspect_ratio_embedder.linear_2.",
    "final_layer.linear.": "proj_out.",
    "final_layer.scale_shift_table": "scale_shift_table",
}
# Per-block keys that are renamed without splitting: original suffix -> diffusers suffix.
_ORIGINAL_BLOCK = {
    "scale_shift_table": "scale_shift_table",
    "attn.proj.": "attn1.to_out.0.",
    "cross_attn.q_linear.": "attn2.to_q.",
    "cross_attn.proj.": "attn2.to_out.0.",
    "mlp.fc1.": "ff.net.0.proj.",
    "mlp.fc2.": "ff.net.2.",
    # Σ extensions (no diffusers equivalent; named in diffusers' style).
    "attn.q_norm.": "attn1.q_norm.",
    "attn.k_norm.": "attn1.k_norm.",
    "attn.sr.": "attn1.kv_compress.",
    "attn.norm.": "attn1.kv_compress_norm.",
}
# Keys the original checkpoints carry that are not weights of the model.
_ORIGINAL_DROPPED = ("pos_embed", "y_embedder.y_embedding")


def _rename_prefix(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return None


def original_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original PixArt `.pth` state dict -> diffusers names (splits fused qkv / kv)."""
    out, unknown = {}, []
    for key, value in state.items():
        if key in _ORIGINAL_DROPPED:
            continue
        renamed = _rename_prefix(key, _ORIGINAL_TOP)
        if renamed is not None:
            out[renamed] = value
            continue
        match = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if match is None:
            unknown.append(key)
            continue
        index, rest = match.groups()
        prefix = f"transformer_blocks.{index}."
        if rest.startswith("attn.qkv."):
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{prefix}attn1.{name}.{rest.split('.')[-1]}"] = part
            continue
        if rest.startswith("cross_attn.kv_linear."):
            for name, part in zip(("to_k", "to_v"), value.chunk(2, dim=0)):
                out[f"{prefix}attn2.{name}.{rest.split('.')[-1]}"] = part
            continue
        renamed = _rename_prefix(rest, _ORIGINAL_BLOCK)
        if renamed is None:
            unknown.append(key)
        else:
            out[prefix + renamed] = value
    if unknown:
        raise CheckpointError(f"unexpected keys in original PixArt checkpoint: {_short_list(unknown)}")
    return out


# --------------------------------------------------------------------------------------
# diffusers  <->  pixforge
# --------------------------------------------------------------------------------------
_DIFFUSERS_BLOCK_RENAMES = {  # diffusers suffix -> pixforge suffix (no fusing involved)
    "attn1.to_out.0.": "attn1.to_out.",
    "attn2.to_out.0.": "attn2.to_out.",
    "ff.net.0.proj.": "ff.fc1.",
    "ff.net.2.": "ff.fc2.",
}
_FUSED = {  # pixforge fused projection -> the diffusers projections it concatenates (in order)
    "attn1.to_qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn2.to_kv": ("attn2.to_k", "attn2.to_v"),
}


def diffusers_to_pixforge(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = re.match(r"(transformer_blocks\.\d+\.)(.+)$", key)
        if match is None:
            out[key] = value
            continue
        prefix, rest = match.groups()
        fused_target = next(
            (fused for fused, parts in _FUSED.items() for part in parts if rest.startswith(part + ".")), None
        )
        if fused_target is not None:
            pending.setdefault(prefix + fused_target + "." + rest.rsplit(".", 1)[1], {})[rest.rsplit(".", 1)[0]] = value
            continue
        renamed = _rename_prefix(rest, _DIFFUSERS_BLOCK_RENAMES)
        out[prefix + (renamed if renamed is not None else rest)] = value
    for fused_key, parts in pending.items():
        fused_name = fused_key.split(".", 2)[2].rsplit(".", 1)[0]
        expected = _FUSED[fused_name]
        missing = [name for name in expected if name not in parts]
        if missing:
            block = fused_key.rsplit(".", 2)[0]
            raise CheckpointError(f"checkpoint has partial projections for {block}: missing {missing}")
        out[fused_key] = torch.cat([parts[name] for name in expected], dim=0)
    return out


def pixforge_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inverse = {new: old for old, new in _DIFFUSERS_BLOCK_RENAMES.items()}
    out = {}
    for key, value in state.items():
        match = re.match(r"(transformer_blocks\.\d+\.)(.+)$", key)
        if match is None:
            out[key] = value
            continue
        prefix, rest = match.groups()
        module, _, leaf = rest.rpartition(".")
        if module in _FUSED:
            parts = _FUSED[module]
            for name, chunk in zip(parts, value.chunk(len(parts), dim=0)):
                out[f"{prefix}{name}.{leaf}"] = chunk.contiguous()
            continue
        renamed = _rename_prefix(rest, inverse)
        out[prefix + (renamed if renamed is not None else rest)] = value
    return out


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith("blocks.") or k.startswith("x_embedder.") for k in keys):
        return "original"
    if any(".attn1.to_qkv." in k for k in keys):
        return "pixforge"
    if any(k.startswith("transformer_blocks.") for k in keys):
        return "diffusers"
    raise CheckpointError(
        "not a PixArt transformer checkpoint: no 'blocks.*' (original) or 'transformer_blocks.*' "
        f"(diffusers) keys; first keys: {_short_list(keys)}"
    )


def to_pixforge_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layout = detect_layout(state)
    if layout == "original":
        state = original_to_diffusers(state)
        layout = "diffusers"
    if layout == "diffusers":
        state = diffusers_to_pixforge(state)
    return state


# --------------------------------------------------------------------------------------
# Config inference from weights (for single files and for helpful error messages)
# --------------------------------------------------------------------------------------
def infer_config(state: dict[str, torch.Tensor], num_attention_heads: int | None = None) -> TransformerConfig:
    """Best guess of the architecture from diffusers-layout weight shapes.

    Heads cannot be read from weights: taken from a preset of the same width, else width/64.
    """
    try:
        proj = state["pos_embed.proj.weight"]  # (D, C, p, p)
        dim, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
        out_features = state["proj_out.weight"].shape[0]
    except KeyError as error:
        raise CheckpointError(f"cannot infer the architecture: key {error} is missing") from error
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    num_layers = max(blocks) + 1 if blocks else 0
    caption = state.get("caption_projection.linear_1.weight")
    micro = "adaln_single.emb.resolution_embedder.linear_1.weight" in state
    compressed = tuple(sorted(
        int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.attn1\.kv_compress\.weight", k))
    ))
    scale = 2
    if compressed:
        scale = state[f"transformer_blocks.{compressed[0]}.attn1.kv_compress.weight"].shape[-1]
    if num_attention_heads is None:
        same_width = [c for c in PRESETS.values() if c.inner_dim == dim]
        num_attention_heads = same_width[0].num_attention_heads if same_width else max(dim // 64, 1)
    return TransformerConfig(
        num_attention_heads=num_attention_heads,
        attention_head_dim=dim // num_attention_heads,
        in_channels=in_channels,
        out_channels=out_features // (patch * patch),
        num_layers=num_layers,
        cross_attention_dim=dim,
        patch_size=patch,
        caption_channels=None if caption is None else caption.shape[1],
        use_additional_conditions=micro,
        kv_compress_layers=compressed,
        kv_compress_scale=scale,
        qk_norm="transformer_blocks.0.attn1.q_norm.weight" in state,
    )


def _expected_shapes(config: TransformerConfig) -> dict[str, tuple]:
    """Parameter shapes of a model with this config, without allocating it."""
    from pixforge.models.transformer import PixArtTransformer

    with torch.device("meta"):
        model = PixArtTransformer(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------
def _short_list(items, limit: int = 6) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        state, metadata = {}, {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
        return state, metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"cannot read {path}: corrupt or truncated safetensors file ({error})") from error


def read_pth(path: Path) -> dict[str, torch.Tensor]:
    """An original PixArt `.pth`: tensors only (`weights_only=True`), never code."""
    import pickle

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it contains pickled objects other than tensors "
            f"(possibly code); only weights are accepted ({str(error).splitlines()[0]})"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: corrupt or truncated checkpoint ({error})") from error
    if isinstance(data, dict):
        for wrapper in ("state_dict_ema", "ema", "state_dict", "model"):
            if wrapper in data and isinstance(data[wrapper], dict):
                logger.info("using the '%s' weights of %s", wrapper, path)
                data = data[wrapper]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return data


def _read_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    config = None
    if (folder / CONFIG_NAME).exists():
        try:
            config = json.loads((folder / CONFIG_NAME).read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{folder / CONFIG_NAME} is not valid JSON: {error}") from error
    if (folder / WEIGHTS_INDEX_NAME).exists():
        index = json.loads((folder / WEIGHTS_INDEX_NAME).read_text())
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(read_safetensors(folder / shard)[0])
        return state, config
    if (folder / WEIGHTS_NAME).exists():
        return read_safetensors(folder / WEIGHTS_NAME)[0], config
    for candidate in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (folder / candidate).exists():
            return read_pth(folder / candidate), config
    raise CheckpointError(f"no weights in {folder}: expected {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or a .bin file")


def load_state(path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict in its own layout, config dict if the source carries one)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        if (path / "transformer").is_dir():  # a whole pipeline folder
            path = path / "transformer"
        return _read_folder(path)
    if path.suffix == ".safetensors":
        state, metadata = read_safetensors(path)
        config = json.loads(metadata["config"]) if "config" in metadata else None
        return state, config
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return read_pth(path), None
    raise CheckpointError(f"unsupported checkpoint file {path}: expected a folder, .safetensors or .pth")


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "zeros_", "ones_", "constant_", "orthogonal_")


@contextmanager
def skipped_init():
    """Build modules without their random initialisation (torch.nn.init's fillers do nothing
    inside), for a model that a strict load overwrites entirely right after: on the 2-core
    machine the default transformer's and VAE's init took ~0.1 s of a 0.3 s load. Parameters
    are allocated as usual (torch.empty), so nothing about their memory changes; a strict load
    (every parameter and persistent buffer present, or an error) is what makes this safe.
    Patches the module for the time of the block: not for use while another thread builds a
    model that keeps its initialisation."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, _keep)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _keep(tensor, *args, **kwargs):
    return tensor


def load_transformer(
    path,
    config: TransformerConfig | str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
):
    """Build a `PixArtTransformer` from any supported checkpoint.

    config: a TransformerConfig or preset name; defaults to the checkpoint's config.json
    (folders, our safetensors metadata) or, for bare weight files, a config inferred from
    the weight shapes.
    """
    from pixforge.models.presets import get_preset
    from pixforge.models.transformer import PixArtTransformer

    raw_state, raw_config = load_state(path)
    layout = detect_layout(raw_state)
    diffusers_state = original_to_diffusers(raw_state) if layout == "original" else (
        pixforge_to_diffusers(raw_state) if layout == "pixforge" else raw_state
    )
    if isinstance(config, str):
        config = get_preset(config)
    if config is None:
        if raw_config is not None:
            config = TransformerConfig.from_dict(raw_config)
        else:
            config = infer_config(diffusers_state)
            # The original 1024-MS checkpoints are the only ones with micro-condition weights
            # and they were trained at sample_size 128 with interpolation scale 2.
            logger.info("no config in %s: inferred %s", path, config)
    with skipped_init():  # the strict load below sets every parameter
        model = PixArtTransformer(config)
    load_into(model, diffusers_to_pixforge(diffusers_state), source=str(path))
    if torch_dtype is not None:
        model.to(torch_dtype)
    return model.to(device).eval()


def state_dict_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]):
    """-> (missing keys, unexpected keys, [(key, shape in state, expected shape)])."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        (k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    return missing, unexpected, misshaped


def load_into(model, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict load with an error naming missing / unexpected / mis-shaped keys."""
    missing, unexpected, misshaped = state_dict_mismatch(model.state_dict(), state)
    misshaped = [f"{k} {got} vs {want}" for k, got, want in misshaped]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing keys: {_short_list(pixforge_to_diffusers_names(missing))}")
        if unexpected:
            problems.append(f"unexpected keys: {_short_list(pixforge_to_diffusers_names(unexpected))}")
        if misshaped:
            problems.append(f"mis-shaped (checkpoint vs model): {_short_list(misshaped)}")
        fits = _presets_fitting(state)
        hint = f"; presets that fit these weights: {', '.join(fits)}" if fits else ""
        raise CheckpointError(f"{source} does not match the model config: " + "; ".join(problems) + hint)
    model.load_state_dict(state, strict=True)


def pixforge_to_diffusers_names(keys: list[str]) -> list[str]:
    """Report keys in diffusers' names (what users see in their files)."""
    # Only the names matter: a 3-element placeholder splits into every fused part (2 or 3).
    return list(pixforge_to_diffusers(dict.fromkeys(keys, torch.zeros(3))))


def _presets_fitting(state: dict[str, torch.Tensor]) -> list[str]:
    wanted = {k: tuple(v.shape) for k, v in state.items()}
    return [name for name, config in PRESETS.items() if _expected_shapes(config) == wanted]


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(Path(path), save(contiguous, metadata=metadata))


def save_transformer(model, directory, max_shard_size: int | None = None) -> None:
    """diffusers layout: config.json + one safetensors file, or shards + index."""
    directory = Path(directory)
    state = pixforge_to_diffusers(model.state_dict())
    atomic_write_bytes(directory / CONFIG_NAME, json.dumps(model.config.to_diffusers_dict(), indent=2).encode())
    if max_shard_size is None:
        atomic_save_safetensors(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        stale = directory / WEIGHTS_INDEX_NAME
        if stale.exists():
            stale.unlink()
        return
    shards, current, size = [], {}, 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[key] = value
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        atomic_save_safetensors(shard, directory / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_bytes(directory / WEIGHTS_INDEX_NAME, json.dumps(index, indent=2).encode())
    single = directory / WEIGHTS_NAME
    if single.exists():
        single.unlink()


def save_single_file(model, path, layout: str = "diffusers") -> None:
    """One .safetensors file (config embedded in its metadata) in diffusers or original layout."""
    state = pixforge_to_diffusers(model.state_dict())
    if layout == "original":
        state = diffusers_to_original(state)
    elif layout != "diffusers":
        raise CheckpointError(f"unknown layout {layout!r}; use 'diffusers' or 'original'")
    metadata = {"format": "pt", "config": json.dumps(model.config.to_dict())}
    atomic_save_safetensors(state, Path(path), metadata=metadata)


def diffusers_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `original_to_diffusers` (used to build original-layout files)."""
    top = {new: old for old, new in _ORIGINAL_TOP.items()}
    block = {new: old for old, new in _ORIGINAL_BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        renamed = _rename_prefix(key, top)
        if renamed is not None:
            out[renamed] = value
            continue
        index, rest = re.match(r"transformer_blocks\.(\d+)\.(.+)$", key).groups()
        module, _, leaf = rest.rpartition(".")
        if module in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
            fused.setdefault(f"blocks.{index}.attn.qkv.{leaf}", {})[module] = value
        elif module in ("attn2.to_k", "attn2.to_v"):
            fused.setdefault(f"blocks.{index}.cross_attn.kv_linear.{leaf}", {})[module] = value
        else:
            out[f"blocks.{index}." + _rename_prefix(rest, block)] = value
    for key, parts in fused.items():
        out[key] = torch.cat([parts[name] for name in sorted(parts, key=lambda n: "qkv".index(n[-1]))], dim=0)
    return out
