"""The shapes world: determinism, splits, holdout, the spec's constraints, the caption grammar."""
import io
import math

import numpy as np
import pytest

from pixforge.errors import PixforgeError
from pixforge.shapes.world import (
    CATEGORIES,
    COLORS,
    MIN_GAP_PX,
    CaptionSpec,
    ObjectGroup,
    Scene,
    WorldConfig,
    canonical_caption,
    from_geneval,
    parse_mix,
    parse_caption,
    relation_holds_strict,
    render,
    sample,
    to_geneval,
)

CANVASES = ((128, 128), (144, 112), (112, 144), (160, 96), (96, 160))
MULTI = WorldConfig(canvas_sizes=CANVASES, paraphrase=True, background_prob=0.3)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_gives_the_same_bytes_and_caption():
    for index in (0, 7, 59):
        a, b = sample(index, "test", MULTI), sample(index, "test", MULTI)
        assert a.caption == b.caption
        assert png_bytes(a.image) == png_bytes(b.image)


def test_another_world_seed_gives_other_scenes():
    other = WorldConfig(canvas_sizes=CANVASES, paraphrase=True, background_prob=0.3, seed=1)
    differ = sum(sample(i, "test", MULTI).scene != sample(i, "test", other).scene for i in range(20))
    assert differ >= 18


def test_splits_draw_different_scenes_for_the_same_index():
    scenes = {split: [sample(i, split).scene for i in range(60)] for split in ("train", "validation", "test")}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        same = sum(x == y for x, y in zip(scenes[a], scenes[b]))
        assert same == 0
    images = {png_bytes(sample(i, "train").image) for i in range(60)}
    assert not images & {png_bytes(sample(i, "test").image) for i in range(60)}


def test_holdout_pairs_never_appear_in_train_but_do_in_test():
    config = WorldConfig(holdout=(("purple", "triangle"), ("red", "circle")))
    train = [(o.color, o.shape) for i in range(300) for o in sample(i, "train", config).scene.objects]
    test = [(o.color, o.shape) for i in range(300) for o in sample(i, "test", config).scene.objects]
    assert ("purple", "triangle") not in train and ("red", "circle") not in train
    assert ("purple", "triangle") in test and ("red", "circle") in test


def test_scenes_respect_sizes_gaps_canvas_and_relations():
    for index in range(60):
        scene = sample(index, "validation", MULTI).scene
        shorter = min(scene.width, scene.height)
        assert 1 <= len(scene.objects) <= 4
        for obj in scene.objects:
            assert 0.18 * shorter <= obj.size <= 0.32 * shorter
            x0, y0, x1, y1 = obj.bbox
            assert x0 >= 0 and y0 >= 0 and x1 <= scene.width and y1 <= scene.height
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                gap_x = max(b.x0 - (a.x0 + a.size), a.x0 - (b.x0 + b.size))
                gap_y = max(b.y0 - (a.y0 + a.size), a.y0 - (b.y0 + b.size))
                assert max(gap_x, gap_y) >= MIN_GAP_PX
        if scene.relation is not None:
            a, b = scene.objects
            dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
            along, side = {"left of": (-dx, scene.width), "right of": (dx, scene.width),
                           "above": (-dy, scene.height), "below": (dy, scene.height)}[scene.relation]
            assert along >= 0.25 * side


def test_render_has_the_canvas_size_background_and_object_colours():
    scene = Scene(160, 96, "gray", (
        Scene.from_json({"width": 160, "height": 96, "background": "gray", "category": "single_object",
                         "objects": [{"shape": "square", "color": "blue", "bbox": [10, 20, 40, 50], "size": 30}]}
                        ).objects[0],), "background", None, True)
    pixels = np.asarray(render(scene))
    assert pixels.shape == (96, 160, 3)
    assert tuple(pixels[0, 0]) == (128, 128, 128)
    assert tuple(pixels[35, 25]) == COLORS["blue"]


def test_every_category_appears_with_the_default_mix():
    seen = {sample(i, "train").scene.category for i in range(120)}
    assert seen == set(CATEGORIES)


@pytest.mark.parametrize("spec, caption", [
    (CaptionSpec((ObjectGroup("red", "circle"),)), "a red circle"),
    (CaptionSpec((ObjectGroup("orange", "square"),)), "an orange square"),
    (CaptionSpec((ObjectGroup("blue", "square", 3),)), "three blue squares"),
    (CaptionSpec((ObjectGroup("red", "circle"), ObjectGroup("orange", "triangle"))),
     "a red circle and an orange triangle"),
    (CaptionSpec((ObjectGroup("red", "circle"), ObjectGroup("blue", "square")), "left of"),
     "a red circle to the left of a blue square"),
    (CaptionSpec((ObjectGroup("green", "triangle"),), None, "gray"), "a green triangle on a gray background"),
])
def test_canonical_captions_follow_the_grammar(spec, caption):
    assert canonical_caption(spec) == caption
    assert parse_caption(caption) == spec


@pytest.mark.parametrize("caption, spec", [
    ("red circle left of blue square",
     CaptionSpec((ObjectGroup("red", "circle"), ObjectGroup("blue", "square")), "left of")),
    ("a circle that is red", CaptionSpec((ObjectGroup("red", "circle"),))),
    ("two squares, both blue", CaptionSpec((ObjectGroup("blue", "square", 2),))),
    ("four triangles that are pink on black", CaptionSpec((ObjectGroup("pink", "triangle", 4),), None, "black")),
    ("A photo of a cyan square beneath a yellow circle.",
     CaptionSpec((ObjectGroup("cyan", "square"), ObjectGroup("yellow", "circle")), "below")),
])
def test_paraphrases_parse_to_the_same_spec(caption, spec):
    assert parse_caption(caption) == spec


def test_every_paraphrase_parses_back_to_its_scene():
    for index in range(200):
        item = sample(index, "test", MULTI)
        assert parse_caption(item.caption).canonical() == item.scene.spec().canonical(), item.caption


@pytest.mark.parametrize("caption", ["a brown circle", "a red hexagon", "red circles", "a red circle a blue square"])
def test_captions_outside_the_world_are_rejected(caption):
    with pytest.raises(PixforgeError):
        parse_caption(caption)


def test_geneval_records_round_trip_with_relation_on_the_second_entry():
    spec = CaptionSpec((ObjectGroup("red", "circle"), ObjectGroup("blue", "square")), "left of")
    record = to_geneval(spec, canonical_caption(spec), "position")
    assert record["include"][0] == {"class": "square", "count": 1, "color": "blue"}
    assert record["include"][1]["position"] == ["left of", 0]
    assert from_geneval(record) == spec


def test_strict_relation_rule_needs_a_quarter_of_the_side():
    anchor = (60, 50, 20)
    assert relation_holds_strict((28, 50, 20), anchor, "left of", 128, 128)  # 32 px = 25%
    assert not relation_holds_strict((29, 50, 20), anchor, "left of", 128, 128)
    assert not relation_holds_strict((20, 80, 20), anchor, "left of", 128, 128)  # too far across


def test_bad_config_values_are_rejected_with_the_allowed_values():
    with pytest.raises(PixforgeError, match="purple"):
        WorldConfig(holdout=(("brown", "triangle"),))
    with pytest.raises(PixforgeError, match="category"):
        WorldConfig(mix=(("landscape", 1.0),))
    with pytest.raises(PixforgeError, match="split"):
        sample(0, "dev")


def test_the_world_imports_only_numpy_and_pil():
    import subprocess
    import sys

    code = ("import sys, pixforge.shapes, pixforge.shapes.export, pixforge.shapes.degrade; "
            "print(sorted(m for m in ('torch', 'scipy', 'matplotlib', 'torchmetrics') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_category_mix_parses_with_unnamed_categories_at_one_and_bad_items_named():
    assert dict(parse_mix("")) == {c: 1.0 for c in CATEGORIES}
    assert dict(parse_mix(" position=3, counting=0.5 ")) == {**{c: 1.0 for c in CATEGORIES}, "position": 3.0, "counting": 0.5}
    for text, message in [("postion=3", "'postion=3'"), ("position", "'position'"), ("position=x", "'x' is not a number"),
                          ("position=-1", ">= 0"), ("position=nan", ">= 0"), ("position=inf", "finite"),
                          (",".join(f"{c}=0" for c in CATEGORIES), "no positive weight")]:
        with pytest.raises(PixforgeError, match=message):
            parse_mix(text)
