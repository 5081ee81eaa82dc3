"""The shapes world (docs: ../../../../shared/SHAPES.md, docs/evaluation.md).

A procedural text-to-image domain with exact ground truth: filled circles, squares and
triangles in eight colours on a white, gray or black canvas. This module holds the
whole world: the palette, scene sampling (deterministic per split and index), rendering,
the caption grammar with its paraphrases, and the caption parser the checker uses.

Only numpy and PIL are imported, so data loaders and the checker stay light.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from pixforge.errors import PixforgeError
from pixforge.relations import CONJUNCTION, find_relation

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (249, 115, 22),
    "yellow": (234, 179, 8),
    "green": (22, 163, 74),
    "cyan": (6, 182, 212),
    "blue": (37, 99, 235),
    "purple": (147, 51, 234),
    "pink": (236, 72, 153),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
# Category names follow GenEval's tags where GenEval has one.
CATEGORIES: tuple[str, ...] = (
    "single_object", "counting", "two_object", "position", "color_attr", "background",
)
# Relation names follow GenEval ("left of", ...); captions use the phrases.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_PHRASES = {
    "left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below",
}
OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SPLITS: dict[str, int] = {"train": 0, "validation": 1, "test": 2}

MIN_SIZE_FRACTION = 0.18  # bounding-box side, fraction of the shorter canvas side
MAX_SIZE_FRACTION = 0.32
MIN_GAP_PX = 2  # bounding boxes never come closer than this
POSITION_MIN_FRACTION = 0.25  # centre offset along the relation axis, fraction of that side
POSITION_MAX_CROSS_RATIO = 0.5  # |offset across| ≤ this × |offset along|: the relation is unambiguous
MAX_OBJECTS = 4


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape; its bounding box is the square [x0, x0+size) × [y0, y0+size)."""

    shape: str
    color: str
    x0: int
    y0: int
    size: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x0 + self.size, self.y0 + self.size)

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.size / 2, self.y0 + self.size / 2)


@dataclass(frozen=True)
class ObjectGroup:
    """`count` identical objects named together in a caption ("three blue squares")."""

    color: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for. `relation` reads groups[0] <relation> groups[1];
    background None means the caption names none (so the canvas must be white)."""

    groups: tuple[ObjectGroup, ...]
    relation: str | None = None
    background: str | None = None

    @property
    def expected_background(self) -> str:
        return self.background or "white"

    def canonical(self) -> "CaptionSpec":
        """The same request with "right of"/"below" turned round ("b left of a"), so two
        specs compare equal exactly when they ask for the same image."""
        if self.relation in ("right of", "below"):
            return CaptionSpec(self.groups[::-1], OPPOSITE_RELATION[self.relation], self.background)
        if self.relation is None:
            return CaptionSpec(tuple(sorted(self.groups, key=lambda g: (g.color, g.shape, g.count))),
                               None, self.background)
        return self

    def counts(self) -> dict[tuple[str, str], int]:
        """(color, shape) → number of objects the caption names."""
        counts: dict[tuple[str, str], int] = {}
        for group in self.groups:
            key = (group.color, group.shape)
            counts[key] = counts.get(key, 0) + group.count
        return counts


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    objects: tuple[ShapeObject, ...]
    category: str
    relation: str | None = None  # objects[0] <relation> objects[1] (position scenes)
    background_named: bool = False  # whether the caption names the background

    def spec(self) -> CaptionSpec:
        """The caption spec this scene is the ground truth of."""
        if self.category == "counting":
            first = self.objects[0]
            groups = (ObjectGroup(first.color, first.shape, len(self.objects)),)
        else:
            groups = tuple(ObjectGroup(o.color, o.shape, 1) for o in self.objects)
        background = self.background if self.background_named else None
        return CaptionSpec(groups, self.relation, background)

    def to_json(self) -> dict:
        return {
            "category": self.category,
            "width": self.width,
            "height": self.height,
            "background": self.background,
            "background_named": self.background_named,
            "relation": self.relation,
            "objects": [
                {"shape": o.shape, "color": o.color, "bbox": list(o.bbox), "size": o.size}
                for o in self.objects
            ],
        }

    @staticmethod
    def from_json(record: dict) -> "Scene":
        objects = tuple(
            ShapeObject(o["shape"], o["color"], int(o["bbox"][0]), int(o["bbox"][1]), int(o["size"]))
            for o in record["objects"]
        )
        return Scene(
            width=int(record["width"]),
            height=int(record["height"]),
            background=record["background"],
            objects=objects,
            category=record["category"],
            relation=record.get("relation"),
            background_named=bool(record.get("background_named", False)),
        )


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn. Sample i of a split depends only on (seed, split, i) and this config."""

    canvas_sizes: tuple[tuple[int, int], ...] = ((128, 128),)  # (width, height); one is picked per sample
    mix: tuple[tuple[str, float], ...] = tuple((c, 1.0) for c in CATEGORIES)  # category → weight
    background_prob: float = 0.0  # chance that a non-background category also names a background
    paraphrase: bool = False  # pick among caption templates instead of the canonical grammar
    holdout: tuple[tuple[str, str], ...] = ()  # (color, shape) pairs that never appear in "train"
    seed: int = 0  # the world's seed: another value gives another, equally fixed, dataset

    def __post_init__(self) -> None:
        for width, height in self.canvas_sizes:
            if width < 32 or height < 32:
                raise PixforgeError(f"canvas size {width}x{height} is too small: both sides must be >= 32")
        for category, weight in self.mix:
            if category not in CATEGORIES:
                raise PixforgeError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")
            if weight < 0:
                raise PixforgeError(f"category weight for {category!r} is {weight}; it must be >= 0")
        if sum(weight for _, weight in self.mix) <= 0:
            raise PixforgeError("the category mix has no positive weight")
        for color, shape in self.holdout:
            if color not in COLORS or shape not in SHAPES:
                raise PixforgeError(
                    f"holdout pair ({color!r}, {shape!r}) is not a palette colour and a shape; "
                    f"colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}"
                )
        if len(self.holdout) >= len(COLORS) * len(SHAPES) - 2:
            raise PixforgeError(f"holdout removes {len(self.holdout)} of 24 colour-shape pairs; keep at least 3")


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """"position=3,counting=2" -> every category with its weight (unnamed categories keep 1.0).

    The empty string is the uniform mix. Raises PixforgeError naming the bad item."""
    weights = {c: 1.0 for c in CATEGORIES}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in CATEGORIES:
            raise PixforgeError(
                f"category mix item {item!r} is not category=weight with a category from {', '.join(CATEGORIES)}"
            )
        try:
            weight = float(value)
        except ValueError as error:
            raise PixforgeError(f"category mix item {item!r}: weight {value.strip()!r} is not a number") from error
        if not (math.isfinite(weight) and weight >= 0):
            raise PixforgeError(f"category mix item {item!r}: the weight must be a finite number >= 0")
        weights[name] = weight
    if sum(weights.values()) <= 0:
        raise PixforgeError(f"category mix {text!r} has no positive weight")
    return tuple(weights.items())


@dataclass(frozen=True)
class Sample:
    scene: Scene
    caption: str
    split: str
    index: int

    @property
    def image(self) -> Image.Image:
        return render(self.scene)


def sample_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    """The generator of sample `index` of `split`: splits are disjoint streams of one world seed."""
    if split not in SPLITS:
        raise PixforgeError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if index < 0:
        raise PixforgeError(f"sample index {index} must be >= 0")
    return np.random.default_rng([seed, SPLITS[split], index])


def sample(index: int, split: str = "train", config: WorldConfig = WorldConfig()) -> Sample:
    """Sample `index` of `split`: always the same scene and caption for the same config."""
    rng = sample_rng(split, index, config.seed)
    holdout = set(config.holdout) if split == "train" else set()
    scene = sample_scene(rng, config, holdout)
    caption = paraphrase(scene.spec(), rng) if config.paraphrase else canonical_caption(scene.spec())
    return Sample(scene, caption, split, index)


def sample_scene(rng: np.random.Generator, config: WorldConfig, holdout: set = frozenset()) -> Scene:
    names = [c for c, _ in config.mix]
    weights = np.array([w for _, w in config.mix], dtype=np.float64)
    category = names[rng.choice(len(names), p=weights / weights.sum())]
    width, height = config.canvas_sizes[rng.integers(len(config.canvas_sizes))]
    allowed = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in holdout]

    relation = None
    if category in ("single_object", "background"):
        pairs = [allowed[rng.integers(len(allowed))]]
    elif category == "counting":
        pairs = [allowed[rng.integers(len(allowed))]] * int(rng.integers(2, MAX_OBJECTS + 1))
    elif category == "two_object":
        # Two distinct objects sharing colour or shape; both differing is "color_attr".
        pairs = _draw_two(rng, allowed, lambda a, b: a != b and (a[0] == b[0] or a[1] == b[1]))
    elif category == "color_attr":
        pairs = _draw_two(rng, allowed, lambda a, b: a[0] != b[0] and a[1] != b[1])
    else:  # position
        pairs = _draw_two(rng, allowed, lambda a, b: a != b)
        relation = RELATIONS[rng.integers(len(RELATIONS))]

    if category == "background":
        background, named = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], True
    elif config.background_prob > 0 and rng.random() < config.background_prob:
        background, named = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], True
    else:
        background, named = "white", False

    boxes = _place(rng, width, height, len(pairs), relation)
    objects = tuple(ShapeObject(s, c, x0, y0, size) for (c, s), (x0, y0, size) in zip(pairs, boxes))
    return Scene(width, height, background, objects, category, relation, named)


def _draw_two(rng: np.random.Generator, allowed: list, accept) -> list:
    for _ in range(10_000):
        first, second = allowed[rng.integers(len(allowed))], allowed[rng.integers(len(allowed))]
        if accept(first, second):
            return [first, second]
    raise PixforgeError("the holdout leaves no pair of objects for this category; hold out fewer pairs")


def _place(rng: np.random.Generator, width: int, height: int, count: int, relation: str | None) -> list:
    """Non-overlapping square boxes (x0, y0, size) inside the canvas; the first two satisfy `relation`."""
    shorter = min(width, height)
    low, high = math.ceil(MIN_SIZE_FRACTION * shorter), math.floor(MAX_SIZE_FRACTION * shorter)
    for _ in range(1000):  # restart with new sizes when a crowded layout gets stuck
        boxes: list[tuple[int, int, int]] = []
        for _ in range(count):
            size = int(rng.integers(low, high + 1))
            for _ in range(200):
                box = (int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1)), size)
                if any(_too_close(box, other) for other in boxes):
                    continue
                if relation is not None and len(boxes) == 1 and not relation_holds_strict(
                    box, boxes[0], relation, width, height
                ):
                    continue
                boxes.append(box)
                break
            else:
                break
        if len(boxes) == count:
            if relation is not None:  # the relation was checked with the second box placed first
                boxes[0], boxes[1] = boxes[1], boxes[0]
            return boxes
    raise PixforgeError(f"could not place {count} objects on a {width}x{height} canvas")


def _too_close(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    ax0, ay0, asz = a
    bx0, by0, bsz = b
    apart_x = ax0 + asz + MIN_GAP_PX <= bx0 or bx0 + bsz + MIN_GAP_PX <= ax0
    apart_y = ay0 + asz + MIN_GAP_PX <= by0 or by0 + bsz + MIN_GAP_PX <= ay0
    return not (apart_x or apart_y)


def relation_holds_strict(a, b, relation: str, width: int, height: int) -> bool:
    """The generation rule: box a's centre is ≥25% of the side from b's along the relation's
    axis, in its direction, and the offset across is at most half the offset along."""
    dx = (a[0] + a[2] / 2) - (b[0] + b[2] / 2)
    dy = (a[1] + a[2] / 2) - (b[1] + b[2] / 2)
    along, across, side = {
        "left of": (-dx, dy, width), "right of": (dx, dy, width),
        "above": (-dy, dx, height), "below": (dy, dx, height),
    }[relation]
    return along >= POSITION_MIN_FRACTION * side and abs(across) <= POSITION_MAX_CROSS_RATIO * along


# --------------------------------------------------------------------------- rendering


def render(scene: Scene, supersample: int = 4) -> Image.Image:
    """RGB image of `scene`: drawn at `supersample`× and box-filtered down (anti-aliased edges)."""
    s = supersample
    canvas = Image.new("RGB", (scene.width * s, scene.height * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        x0, y0, x1, y1 = (v * s for v in obj.bbox)
        color = COLORS[obj.color]
        if obj.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color)
        elif obj.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=color)
        else:  # isosceles triangle, apex up, base horizontal
            draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=color)
    if s == 1:
        return canvas
    return canvas.resize((scene.width, scene.height), Image.Resampling.BOX)


# --------------------------------------------------------------------------- captions


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(group: ObjectGroup, form: int = 0) -> str:
    c, s, n = group.color, group.shape, group.count
    if n == 1:
        forms = (f"{article(c)} {c} {s}", f"{c} {s}", f"{article(s)} {s} that is {c}",
                 f"one {c} {s}", f"a single {c} {s}")
    else:
        word = NUMBER_WORDS[n]
        every = "both" if n == 2 else "all"
        forms = (f"{word} {c} {s}s", f"{word} {s}s that are {c}", f"{word} {s}s, {every} {c}",
                 f"{n} {c} {s}s")
    return forms[form % len(forms)]


def canonical_caption(spec: CaptionSpec) -> str:
    """The grammar of SHAPES.md: "a red circle", "three blue squares", "a red circle and an
    orange square", "a red circle to the left of a blue square", + " on a gray background"."""
    phrases = [_noun_phrase(g) for g in spec.groups]
    if spec.relation is not None:
        text = f"{phrases[0]} {RELATION_PHRASES[spec.relation]} {phrases[1]}"
    else:
        text = " and ".join(phrases)
    if spec.background is not None:
        text += f" on {article(spec.background)} {spec.background} background"
    return text


_RELATION_FORMS = {
    "left of": ("to the left of", "left of", "on the left of", "is to the left of"),
    "right of": ("to the right of", "right of", "on the right of", "is to the right of"),
    "above": ("above", "over", "is above", "on top of"),
    "below": ("below", "under", "beneath", "is below"),
}
_CONJUNCTIONS = ("and", "and", "together with", "as well as")
_BACKGROUND_FORMS = ("on {a} {bg} background", "on {bg}", "against {a} {bg} background", "with {a} {bg} background")


def paraphrase(spec: CaptionSpec, rng: np.random.Generator) -> str:
    """A caption for `spec` picked among templates ("red circle left of blue square",
    "a circle that is red", "two squares, both blue", the relation stated the other way round)."""
    groups, relation = list(spec.groups), spec.relation
    if relation is not None and rng.random() < 0.3:  # "b right of a" for "a left of b"
        groups, relation = groups[::-1], OPPOSITE_RELATION[relation]
    forms = [int(rng.integers(8)) for _ in groups]
    phrases = [_noun_phrase(g, f) for g, f in zip(groups, forms)]
    if relation is not None:
        forms_of_relation = _RELATION_FORMS[relation]
        text = f"{phrases[0]} {forms_of_relation[rng.integers(len(forms_of_relation))]} {phrases[1]}"
    else:
        text = phrases[0]
        for phrase in phrases[1:]:
            text += f" {_CONJUNCTIONS[rng.integers(len(_CONJUNCTIONS))]} {phrase}"
    if spec.background is not None:
        form = _BACKGROUND_FORMS[rng.integers(len(_BACKGROUND_FORMS))]
        text += " " + form.format(a=article(spec.background), bg=spec.background)
    return text


# --------------------------------------------------------------------------- parsing

_NUMBERS = {"a": 1, "an": 1, "one": 1, "single": 1, "1": 1, "two": 2, "2": 2, "three": 3, "3": 3,
            "four": 4, "4": 4}
_SHAPE_WORDS = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES}
_COLOR_WORDS = {c: c for c in COLORS}
_BACKGROUND_WORDS = {"white": "white", "gray": "gray", "grey": "gray", "black": "black"}
_PREFIXES = ("a photo of ", "an image of ", "a picture of ", "a drawing of ", "a render of ")
_BACKGROUND_PATTERN = re.compile(
    r"[,;]?\s*(?:\b(?:on|against|with|over)\s+)?(?:\b(?:a|an|the)\s+)?\b(white|gray|grey|black)"
    r"(?:\s+background\b|\s*$)"
)


def parse_caption(text: str) -> CaptionSpec:
    """Caption (canonical or paraphrased) → CaptionSpec. Raises PixforgeError when the caption
    does not name objects of the shapes world."""
    clean = " ".join(text.lower().replace(".", " ").split())
    for prefix in _PREFIXES:
        if clean.startswith(prefix):
            clean = clean[len(prefix):]
    background = None
    match = _BACKGROUND_PATTERN.search(clean)
    if match is not None:
        background = _BACKGROUND_WORDS[match.group(1)]
        clean = (clean[: match.start()] + " " + clean[match.end():]).strip()

    found = find_relation(clean)
    if found is not None:
        match, relation = found
        first = _parse_noun_phrase(clean[: match.start()], text)
        second = _parse_noun_phrase(clean[match.end():], text)
        if first.count != 1 or second.count != 1:
            raise PixforgeError(f"caption {text!r}: a relation needs one object on each side")
        return CaptionSpec((first, second), relation, background)

    # Split at conjunctions; a piece naming no shape ("both blue") belongs to the previous one.
    pieces: list[str] = []
    for piece in CONJUNCTION.split(clean):
        if pieces and not any(w in _SHAPE_WORDS for w in _words(piece)):
            pieces[-1] += " " + piece
        else:
            pieces.append(piece)
    groups = tuple(_parse_noun_phrase(piece, text) for piece in pieces)
    return CaptionSpec(groups, None, background)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text)


def _parse_noun_phrase(phrase: str, caption: str) -> ObjectGroup:
    words = _words(phrase)
    colors = [_COLOR_WORDS[w] for w in words if w in _COLOR_WORDS]
    shapes = [w for w in words if w in _SHAPE_WORDS]
    numbers = [_NUMBERS[w] for w in words if w in _NUMBERS]
    if len(shapes) != 1:
        raise PixforgeError(
            f"caption {caption!r}: cannot find exactly one shape in {phrase.strip()!r}; "
            f"shapes: {', '.join(SHAPES)}"
        )
    if len(set(colors)) != 1:
        raise PixforgeError(
            f"caption {caption!r}: cannot find exactly one colour in {phrase.strip()!r}; "
            f"colours: {', '.join(COLORS)}"
        )
    plural = shapes[0].endswith("s") and shapes[0] not in SHAPES
    count = max(numbers) if numbers else (2 if "both" in words else None)
    if count is None:
        if plural:
            raise PixforgeError(f"caption {caption!r}: {phrase.strip()!r} names a plural without a number")
        count = 1
    return ObjectGroup(colors[0], _SHAPE_WORDS[shapes[0]], count)


# --------------------------------------------------------------------------- GenEval layout


def infer_category(spec: CaptionSpec) -> str:
    if spec.relation is not None:
        return "position"
    if len(spec.groups) >= 2:
        a, b = spec.groups[0], spec.groups[1]
        return "color_attr" if a.color != b.color and a.shape != b.shape else "two_object"
    if spec.groups[0].count > 1:
        return "counting"
    return "background" if spec.background is not None else "single_object"


def to_geneval(spec: CaptionSpec, prompt: str, tag: str) -> dict:
    """One line of a GenEval-layout prompt file. A relation is stored on the second include
    entry, relative to include[0], as GenEval does: "a X left of a Y" → [Y, X@["left of", 0]]."""
    groups = list(spec.groups)
    include = []
    if spec.relation is not None:
        first, second = groups
        include.append({"class": second.shape, "count": second.count, "color": second.color})
        include.append({"class": first.shape, "count": first.count, "color": first.color,
                        "position": [spec.relation, 0]})
    else:
        include = [{"class": g.shape, "count": g.count, "color": g.color} for g in groups]
    record = {"tag": tag, "include": include, "prompt": prompt, "background": spec.expected_background}
    if tag == "counting":  # GenEval's counting rows also exclude one more
        g = groups[0]
        record["exclude"] = [{"class": g.shape, "count": g.count + 1}]
    return record


def from_geneval(record: dict) -> CaptionSpec:
    include = record["include"]
    groups = [ObjectGroup(item["color"], item["class"], int(item.get("count", 1))) for item in include]
    for group in groups:
        if group.color not in COLORS or group.shape not in SHAPES:
            raise PixforgeError(f"GenEval record names {group.color!r} {group.shape!r}, outside the shapes world")
    relation = None
    for index, item in enumerate(include):
        if item.get("position"):
            relation, anchor = item["position"][0], int(item["position"][1])
            if relation not in RELATIONS:
                raise PixforgeError(f"unknown relation {relation!r}; choose from {', '.join(RELATIONS)}")
            groups = [groups[index], groups[anchor]]
            break
    background = record.get("background")
    named = background if background not in (None, "white") or record.get("tag") == "background" else None
    return CaptionSpec(tuple(groups), relation, named)
