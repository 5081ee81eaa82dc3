"""The compositional checker: passes clean and degraded renders, fails wrong captions with the right reason."""
import numpy as np
import pytest

from pixforge.eval.shapes import check, classify_shape, detect
from pixforge.shapes import degrade
from pixforge.shapes.world import CaptionSpec, ObjectGroup, Scene, ShapeObject, WorldConfig, render, sample

CANVASES = ((128, 128), (144, 112), (112, 144), (160, 96), (96, 160))
CONFIG = WorldConfig(canvas_sizes=CANVASES, paraphrase=True, background_prob=0.3)


def scene(*objects, background="white", named=False, relation=None, width=128, height=128):
    return Scene(width, height, background, tuple(objects), "two_object", relation, named)


def test_clean_renders_pass_with_their_paraphrased_captions():
    failures = [(i, r.reason) for i in range(60)
                for item in [sample(i, "test", CONFIG)] for r in [check(item.image, item.caption)] if not r.passed]
    assert failures == []


def test_degraded_renders_still_pass():
    passed = 0
    for i in range(60):
        item = sample(i, "test", CONFIG)
        passed += check(degrade.degrade(item.image, 1.0, np.random.default_rng(i)), item.caption).passed
    assert passed >= 58


def test_detect_finds_colour_shape_and_position_of_each_object():
    image = render(scene(ShapeObject("circle", "red", 10, 10, 30), ShapeObject("triangle", "cyan", 80, 70, 30),
                         ShapeObject("square", "orange", 70, 10, 24)))
    background, found = detect(image)
    assert background == "white"
    assert sorted((o.color, o.shape) for o in found) == [("cyan", "triangle"), ("orange", "square"), ("red", "circle")]
    circle = next(o for o in found if o.shape == "circle")
    assert circle.center == pytest.approx((25.0, 25.0), abs=0.5)


def test_a_missing_object_is_reported_with_counts():
    image = render(scene(ShapeObject("square", "blue", 10, 10, 28), ShapeObject("square", "blue", 60, 60, 28)))
    result = check(image, "three blue squares")
    assert not result.passed
    assert result.reason == "expected 3 blue squares, found 2"


def test_wrong_colour_and_extra_objects_fail():
    image = render(scene(ShapeObject("circle", "red", 10, 10, 30), ShapeObject("square", "blue", 70, 70, 30)))
    assert check(image, "a red circle and a blue square").passed
    result = check(image, "a red circle")
    assert not result.passed and "found 1 blue square not in the caption" in result.reason
    result = check(image, "a green circle and a blue square")
    assert "expected 1 green circle, found 0" in result.reason


def test_wrong_relation_fails_and_right_one_passes():
    image = render(scene(ShapeObject("circle", "red", 5, 50, 30), ShapeObject("square", "blue", 90, 50, 30),
                         relation="left of"))
    assert check(image, "a red circle to the left of a blue square").passed
    assert check(image, "a blue square to the right of a red circle").passed
    result = check(image, "a red circle above a blue square")
    assert not result.passed and "above" in result.reason


def test_background_must_match_and_defaults_to_white():
    image = render(scene(ShapeObject("triangle", "yellow", 40, 40, 36), background="black", named=True))
    assert check(image, "a yellow triangle on a black background").passed
    result = check(image, "a yellow triangle")
    assert result.reason == "expected white background, found black"


def test_spec_and_caption_inputs_agree():
    image = render(scene(ShapeObject("circle", "pink", 40, 40, 30)))
    spec = CaptionSpec((ObjectGroup("pink", "circle"),))
    assert check(image, spec).passed and check(image, "a pink circle").passed


def test_off_palette_colours_are_not_accepted():
    image = np.full((128, 128, 3), 255, dtype=np.uint8)
    image[40:70, 40:70] = (150, 75, 0)  # brown: orange's hue, not orange
    result = check(image, "an orange square")
    assert not result.passed and "unknown" in result.reason


def test_shape_classifier_on_ideal_masks():
    yy, xx = np.mgrid[0:40, 0:40] + 0.5
    circle = (xx - 20) ** 2 + (yy - 20) ** 2 <= 400
    triangle = np.abs(xx - 20) <= yy / 2
    assert classify_shape(np.ones((40, 40), bool))[0] == "square"
    assert classify_shape(circle)[0] == "circle"
    assert classify_shape(triangle)[0] == "triangle"


def test_touching_neighbours_after_blur_are_counted_separately():
    image = render(scene(ShapeObject("square", "green", 20, 20, 30), ShapeObject("square", "green", 20, 52, 30)))
    blurred = degrade.jpeg(degrade.gaussian_blur(image, 1.2), 40)
    assert check(blurred, "two green squares").passed
