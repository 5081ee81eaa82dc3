"""pixforge: efficient PixArt-family text-to-image diffusion transformers.

The public names are resolved lazily so that `import pixforge` stays cheap
(no torch, diffusers or transformers until a model is actually used).
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "PixArtTransformer": ("pixforge.models.transformer", "PixArtTransformer"),
    "TransformerConfig": ("pixforge.models.presets", "TransformerConfig"),
    "get_preset": ("pixforge.models.presets", "get_preset"),
    "PixArtPipeline": ("pixforge.sampling.pipeline", "PixArtPipeline"),
    "load_pipeline": ("pixforge.sampling.pipeline", "load_pipeline"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pixforge' has no attribute {name!r}")
