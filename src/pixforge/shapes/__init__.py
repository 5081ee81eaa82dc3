"""The shapes world: a procedural text-to-image domain with exact ground truth (SHAPES.md).

`world` samples, renders and captions scenes; `export` writes image folders and GenEval
prompt files; `degrade` blurs, noises, compresses and colour-jitters renders.
"""
from pixforge.shapes.world import (
    BACKGROUNDS,
    CATEGORIES,
    COLORS,
    RELATIONS,
    SHAPES,
    CaptionSpec,
    ObjectGroup,
    Sample,
    Scene,
    ShapeObject,
    WorldConfig,
    canonical_caption,
    parse_caption,
    render,
    sample,
)

__all__ = [
    "BACKGROUNDS", "CATEGORIES", "COLORS", "RELATIONS", "SHAPES", "CaptionSpec", "ObjectGroup",
    "Sample", "Scene", "ShapeObject", "WorldConfig", "canonical_caption", "parse_caption",
    "render", "sample",
]
