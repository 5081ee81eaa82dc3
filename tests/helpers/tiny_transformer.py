"""A tiny PixArtTransformer with every parameter perturbed (no zero-initialised layers)."""
import torch

from pixforge.models.presets import get_preset
from pixforge.models.transformer import PixArtTransformer


def random_transformer(preset: str = "tiny", **changes) -> PixArtTransformer:
    torch.manual_seed(0)
    model = PixArtTransformer(get_preset(preset).replace(**changes)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model
