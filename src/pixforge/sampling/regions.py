"""Regional prompting: a layout of (prompt, box) regions composed into the conditional ε.

For the first part of sampling, the conditional prediction is assembled region by region:
inside each box the model's ε for that region's own prompt, elsewhere the ε for the whole
prompt (where boxes overlap, their average), then classifier-free guidance as usual; the
remaining steps are plain. The same idea as MultiDiffusion's region control and LMD's layout
stage, on the ε rather than on attention.

Why on ε and not attention: the embedded model places objects where the initial noise puts
them whatever the caption says, and a cross-attention bias towards each object's half moves
almost nothing (+0.6 to +3.8 points on position captions); composing ε for the first 12 of 20
steps lifts relation accuracy from 23.1% to 36.2% (`benchmarks/position_steering.py`,
docs/generation.md). Later steps must be plain again: objects are cut at the boxes' edges
(both objects found 91.9% at 12 regional steps, 75.0% at 14, 33.1% at 16).

`auto_layout(prompt)` reads one spatial relation ("A to the left of B", "A above B",
"A beneath B", ...) and gives A and B half the image each, both prompted with any trailing
background phrase of the caption. With a `background` prompt (a model folder names one:
`layout_background` in model_index.json's "_pixforge"; the embedded model's is "a white
background"), each half is narrowed to the middle 60% across the relation's axis and the two
bands beside it are prompted as empty background (the caption's own background phrase when it
has one): the objects land level with each other instead of anywhere in their halves (+3.5 points
on 780 validation position captions for the embedded model; docs/generation.md). With a
background prompt `auto` also lays out counts of three or four of one thing ("three red
circles" → a row of three boxes, "four ..." → quadrants, each "a single red circle", background
between: `counting_layout`). Regions of one layout that share a prompt run as one batch row
(`prepare_layout`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from pixforge.errors import PixforgeError
from pixforge.relations import CONJUNCTION, find_relation

DEFAULT_FRACTION = 0.6  # of the sampling steps: 12 of 20 measured best (docs/generation.md)
BAND = 0.2  # with a background prompt: the bands beside each object's box, as a fraction of the side

# A trailing scene phrase shared by both objects: ", on a gray background", "against black".
_BACKGROUND_TAIL = re.compile(
    r"[,;]?\s+(?:on|against|with|over|in\s+front\s+of)\s+(?:(?:a|an|the)\s+)?[\w-]+(?:\s+background)?\s*\.?\s*$"
)
RELATION_HALVES = {  # relation -> (subject box, object box) as (left, top, right, bottom) fractions
    "left of": ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)),
    "right of": ((0.5, 0.0, 1.0, 1.0), (0.0, 0.0, 0.5, 1.0)),
    "above": ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)),
    "below": ((0.0, 0.5, 1.0, 1.0), (0.0, 0.0, 1.0, 0.5)),
}


@dataclass(frozen=True)
class Region:
    """A prompt for one box; box = (left, top, right, bottom) as fractions of width and height."""

    prompt: str
    box: tuple[float, float, float, float]

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise PixforgeError(f"a region's prompt must be a non-empty string, got {self.prompt!r}")
        box = tuple(self.box) if isinstance(self.box, (tuple, list)) else None
        if box is None or len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box
        ):
            raise PixforgeError(f"region {self.prompt!r}: box must be 4 numbers (left, top, right, bottom), got {self.box!r}")
        left, top, right, bottom = box
        if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
            raise PixforgeError(
                f"region {self.prompt!r}: box {box} must satisfy 0 <= left < right <= 1 and 0 <= top < bottom <= 1"
            )
        object.__setattr__(self, "box", tuple(float(v) for v in box))


@dataclass(frozen=True)
class Layout:
    """Regions, and the fraction of the sampling steps composed region-wise."""

    regions: tuple[Region, ...]
    fraction: float = DEFAULT_FRACTION

    def __post_init__(self):
        regions = tuple(self.regions)
        if not regions or not all(isinstance(r, Region) for r in regions):
            raise PixforgeError("a layout needs at least one Region")
        fraction = self.fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise PixforgeError(f"layout fraction={fraction!r} is invalid: use a number in [0, 1]")
        object.__setattr__(self, "regions", regions)

    def regional_steps(self, steps: int) -> int:
        return int(round(self.fraction * steps))

    def describe(self) -> str:
        """Short text for metadata: 'prompt@l,t,r,b; ...; 60%'."""
        parts = [f"{r.prompt}@{','.join(f'{v:g}' for v in r.box)}" for r in self.regions]
        return "; ".join(parts) + f"; {self.fraction:.0%}"


def background_phrase(context: str) -> str | None:
    """', on a gray background' → 'a gray background'; 'against black' → 'a black background'."""
    match = re.search(r"(?:on|against|with|over|in\s+front\s+of)\s+(.*?)\s*\.?\s*$", context)
    if match is None or not match.group(1):
        return None
    phrase = match.group(1)
    if not phrase.endswith("background"):
        phrase += " background"
    return phrase if re.match(r"(?:a|an|the)\s", phrase) else f"a {phrase}"


def auto_layout(prompt: str, fraction: float = DEFAULT_FRACTION, background: str | None = None) -> Layout | None:
    """One spatial relation in `prompt` → its layout (None when it names none): the two objects
    in halves; with `background` (an empty-scene prompt), in the middle band of their halves,
    the bands beside prompted as background (the prompt's own background phrase if it has one).
    With `background`, also a count of three or four of one thing ("three red circles") → one
    box per object, each prompted with the singular ("a single red circle"), background between."""
    text = " ".join(prompt.split())
    tail = _BACKGROUND_TAIL.search(text)
    context = text[tail.start():].rstrip(" .") if tail else ""
    body = text[: tail.start()] if tail else text.rstrip(" .")
    filler = None if background is None else background_phrase(context) or background
    found = find_relation(body.lower())
    if found is None:
        return None if filler is None else counting_layout(body, context, filler, fraction)
    match, relation = found
    subject, obj = body[: match.start()].strip(" ,"), body[match.end():].strip(" ,")
    if not subject or not obj:
        return None
    boxes = RELATION_HALVES[relation]
    if filler is None:
        return Layout((Region(subject + context, boxes[0]), Region(obj + context, boxes[1])), fraction)
    if relation in ("left of", "right of"):  # level: the middle band of the height
        boxes = [(left, BAND, right, 1 - BAND) for left, _, right, _ in boxes]
        bands = ((0.0, 0.0, 1.0, BAND), (0.0, 1 - BAND, 1.0, 1.0))
    else:
        boxes = [(BAND, top, 1 - BAND, bottom) for _, top, _, bottom in boxes]
        bands = ((0.0, 0.0, BAND, 1.0), (1 - BAND, 0.0, 1.0, 1.0))
    return Layout((Region(subject + context, boxes[0]), Region(obj + context, boxes[1]),
                   *(Region(filler, band) for band in bands)), fraction)


_COUNT = re.compile(r"^((?:(?:a|an)\s+(?:photo|picture|image|drawing|render)\s+of\s+)?)(three|four|3|4)\s+(\S.*)$", re.I)
_COUNT_CLAUSE = re.compile(r"\s+that\s+are\s+|,\s*(?:all|each|both)\s+", re.I)


def singular_phrase(plural: str) -> str | None:
    """'blue squares' → 'blue square'; 'squares that are blue' / 'squares, all blue' → 'square
    that is blue'; 'orange boxes' → 'orange box'. None when the head noun is not a regular plural."""
    parts = _COUNT_CLAUSE.split(plural, maxsplit=1)
    head, clause = parts[0].strip(), (parts[1].strip() if len(parts) > 1 else "")
    if not head or any(CONJUNCTION.search(part.lower()) or re.search("[,;]", part) for part in (head, clause)):
        return None
    *words, noun = head.split()
    low = noun.lower()
    if low.endswith("ies") and len(low) > 4:
        noun = noun[:-3] + "y"
    elif low.endswith(("ches", "shes", "sses", "xes", "zes")):
        noun = noun[:-2]
    elif low.endswith("s") and not low.endswith("ss") and len(low) > 2:
        noun = noun[:-1]
    else:
        return None
    phrase = " ".join([*words, noun])
    return f"{phrase} that is {clause}" if clause else phrase


def counting_layout(body: str, context: str, filler: str, fraction: float = DEFAULT_FRACTION) -> Layout | None:
    """'three red circles' / 'four squares that are blue' → one box per object (COUNT_BOXES), each
    prompted with the singular ("a single red circle", + the caption's background context), the
    gaps between the boxes and the bands beside them prompted as `filler`. None for other
    captions and counts."""
    match = _COUNT.match(body.strip(" ,"))
    if match is None:
        return None
    prefix, number, rest = match.groups()
    count = {"three": 3, "four": 4}.get(number.lower()) or int(number)
    one = singular_phrase(rest.strip(" ,"))
    if one is None:
        return None
    one = f"{prefix}a single {one}"  # "a single": +3.7 ± 2.5 points over "a" (docs/generation.md)
    objects, empty = COUNT_BOXES[count]
    return Layout((*(Region(one + context, box) for box in objects), *(Region(filler, box) for box in empty)), fraction)


def _count_boxes(gap: float, band: float) -> dict[int, tuple[tuple, tuple]]:
    """count → (object boxes, background boxes): three columns in the middle band of the height
    (background bands above and below), four quadrants; `gap` of background between neighbours."""
    g = gap / 2
    thirds = ((0.0, 1 / 3 - g), (1 / 3 + g, 2 / 3 - g), (2 / 3 + g, 1.0))
    three = tuple((left, band, right, 1 - band) for left, right in thirds)
    three_empty = ((0.0, 0.0, 1.0, band), (0.0, 1 - band, 1.0, 1.0),
                   (1 / 3 - g, band, 1 / 3 + g, 1 - band), (2 / 3 - g, band, 2 / 3 + g, 1 - band))
    halves = ((0.0, 0.5 - g), (0.5 + g, 1.0))
    four = tuple((left, top, right, bottom) for top, bottom in halves for left, right in halves)
    four_empty = ((0.5 - g, 0.0, 0.5 + g, 1.0), (0.0, 0.5 - g, 0.5 - g, 0.5 + g), (0.5 + g, 0.5 - g, 1.0, 0.5 + g))
    return {3: (three, three_empty), 4: (four, four_empty)}


COUNT_GAP = 0.125  # background between neighbouring object boxes, fraction of the side (2 latent px at 128²)
COUNT_BOXES = _count_boxes(COUNT_GAP, BAND)


def resolve_layouts(layout, prompts: list[str], background: str | None = None) -> list[Layout | None] | None:
    """`layout` as the pipeline takes it → one Layout (or None) per prompt; None when unused.

    None / "none": no layout. "auto": `auto_layout` of each prompt (with the model's
    `background` prompt, if it has one). A Layout: the same for every prompt. A list: one
    Layout / None / "auto" per prompt.
    """
    if layout is None or (isinstance(layout, str) and layout == "none"):
        return None
    if isinstance(layout, (Layout, str)):
        layout = [layout] * len(prompts)
    if not isinstance(layout, (list, tuple)) or len(layout) != len(prompts):
        raise PixforgeError(
            f"layout must be None, 'auto', a Layout, or one per prompt ({len(prompts)}), got {layout!r}"
        )
    resolved = []
    for item, prompt in zip(layout, prompts):
        if isinstance(item, str):
            if item != "auto":
                raise PixforgeError(f"layout {item!r} is unknown; use 'auto', 'none' or a Layout")
            item = auto_layout(prompt, background=background)
        elif item is not None and not isinstance(item, Layout):
            raise PixforgeError(f"layout entry {item!r} is not a Layout, 'auto' or None")
        resolved.append(item)
    return resolved if any(item is not None for item in resolved) else None


def box_mask(box: tuple[float, float, float, float], height: int, width: int) -> torch.Tensor:
    """(height, width) 0/1 mask of the latent pixels whose centres lie in `box`."""
    left, top, right, bottom = box
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    rows = (ys >= top) & (ys < bottom)
    cols = (xs >= left) & (xs < right)
    return (rows[:, None] & cols[None, :]).float()


def compose(eps_prompt: torch.Tensor, eps_regions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Region-wise ε: (B, C, h, w), (R, B, C, h, w), (R, B, 1, h, w) → (B, C, h, w).

    Inside boxes the regions' ε (averaged where they overlap); the prompt's ε fills the rest.
    """
    coverage = masks.sum(0)  # (B, 1, h, w)
    regional = (masks * eps_regions).sum(0)
    return (regional + (1 - coverage).clamp(min=0) * eps_prompt) / coverage.clamp(min=1)
