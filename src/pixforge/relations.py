"""Spatial relation and conjunction phrases of English captions, shared by the shapes world's
caption parser and the pipeline's automatic layouts (`pixforge.sampling.regions.auto_layout`). Only `re`:
the shapes world and its checker stay free of torch.

Relation names follow GenEval ("left of", "right of", "above", "below"): the relation of the
phrase's subject to its object.
"""
from __future__ import annotations

import re

RELATION_PATTERNS: tuple[tuple[re.Pattern, str], ...] = (  # longest phrases first
    (re.compile(r"\b(?:is\s+|are\s+)?(?:to|on)\s+the\s+left\s+(?:side\s+)?of\b"), "left of"),
    (re.compile(r"\b(?:is\s+|are\s+)?(?:to|on)\s+the\s+right\s+(?:side\s+)?of\b"), "right of"),
    (re.compile(r"\b(?:is\s+|are\s+)?left\s+of\b"), "left of"),
    (re.compile(r"\b(?:is\s+|are\s+)?right\s+of\b"), "right of"),
    (re.compile(r"\b(?:is\s+|are\s+)?on\s+top\s+of\b"), "above"),
    (re.compile(r"\b(?:is\s+|are\s+)?(?:above|over)\b"), "above"),
    (re.compile(r"\b(?:is\s+|are\s+)?(?:below|under|underneath|beneath)\b"), "below"),
)


def find_relation(lowered: str) -> tuple[re.Match, str] | None:
    """The first relation phrase (in pattern order) in a lower-cased caption, with its name."""
    for pattern, relation in RELATION_PATTERNS:
        match = pattern.search(lowered)
        if match is not None:
            return match, relation
    return None


# Words that join two things in one caption ("a red circle and a blue square"); lower-case text.
CONJUNCTION = re.compile(r"\b(?:and|together\s+with|as\s+well\s+as|plus|next\s+to|with)\b")
