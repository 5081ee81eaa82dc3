"""checker_passes: every policy compared sees the same prompts and seeds, chunk by chunk."""
from types import SimpleNamespace

from pixforge.eval.bench import checker_passes
from pixforge.shapes.world import WorldConfig, sample


class RenderingPipe:
    """Stands in for a pipeline: returns each prompt's own clean render (the checker passes it),
    or a blank canvas for prompts listed in `blank`; records how it was called."""

    def __init__(self, items, blank=()):
        self.renders = {item.caption: item.image for item in items}
        self.blank, self.calls, self.layouts = set(blank), [], []

    def __call__(self, prompts, num_inference_steps, seed, progress, cache, layout=None):
        self.calls.append((len(prompts), seed, num_inference_steps, cache))
        self.layouts.append(layout)
        images = [self.renders[p].point(lambda v: 128) if p in self.blank else self.renders[p] for p in prompts]
        return SimpleNamespace(images=images)


def test_checker_passes_chunks_seeds_and_verdicts():
    items = [sample(i, "test", WorldConfig()) for i in range(7)]
    pipe = RenderingPipe(items, blank={items[4].caption})
    passes = checker_passes(pipe, items, steps=20, cache="fora:2", batch=3)
    assert passes == [1, 1, 1, 1, 0, 1, 1]
    assert pipe.calls == [(3, 0, 20, "fora:2"), (3, 3, 20, "fora:2"), (1, 6, 20, "fora:2")]
    seen = []
    assert checker_passes(pipe, items, steps=20, batch=3, on_result=lambda out: seen.append(len(out.images))) == passes
    assert seen == [3, 3, 1]  # every chunk's result, in order


def test_checker_passes_hands_each_chunk_its_items_layouts():
    """One layout for every chunk, or one per item sliced chunk by chunk (the layout benchmarks)."""
    items = [sample(i, "test", WorldConfig()) for i in range(5)]
    pipe = RenderingPipe(items)
    assert checker_passes(pipe, items, steps=20, batch=2, layout="auto") == [1] * 5
    assert pipe.layouts == ["auto"] * 3
    pipe.layouts.clear()
    checker_passes(pipe, items, steps=20, batch=2, layout=["a", None, "c", "d", "e"])
    assert pipe.layouts == [["a", None], ["c", "d"], ["e"]]


def test_evaluation_items_are_the_default_models_evaluation_draw():
    """Samples first..last-1, paraphrased by the training data's golden-ratio rule (a third)."""
    from pixforge.eval.bench import evaluation_items

    items = evaluation_items(10, 40, "validation")
    assert [item.caption for item in items] == [
        sample(i, "validation", WorldConfig(paraphrase=(i * 0.6180339887498949) % 1.0 < 0.33)).caption
        for i in range(10, 40)]
    assert 8 <= sum((i * 0.6180339887498949) % 1.0 < 0.33 for i in range(10, 40)) <= 12


def test_paired_delta_reports_the_mean_difference_and_its_standard_error():
    from pixforge.eval.bench import paired_delta

    assert paired_delta([1, 1, 0, 1], [0, 1, 0, 1]) == "+25.0 ± 25.0 (lost 0, gained 1; n=4)"
    assert paired_delta([0, 1, 1, 0], [1, 0, 1, 0]) == "+0.0 ± 40.8 (lost 1, gained 1; n=4)"


def test_a_check_pool_gives_the_checkers_verdicts_in_order():
    """Worker processes (as beside a GPU) and in-process checking agree, verdict for verdict,
    also through checker_passes; a mismatched batch is refused."""
    import pytest

    from pixforge.errors import PixforgeError
    from pixforge.eval.shapes import CheckPool, check

    items = [sample(i, "test", WorldConfig()) for i in range(9)]
    images = [item.image for item in items]
    images[2] = images[2].point(lambda v: 128)  # fails
    images[7] = images[1]  # another prompt's render: fails
    captions = [item.caption for item in items]
    expected = [check(image, caption).passed for image, caption in zip(images, captions)]
    assert expected.count(False) == 2
    pool = CheckPool(workers=2, chunk=2)
    try:
        first, second = pool.submit(images, captions), pool.submit(images[:3], captions[:3])
        assert second() == expected[:3] and first() == expected
        assert CheckPool(0).submit(images, captions)() == expected
        with pytest.raises(PixforgeError, match="9 images but 8 captions"):
            pool.submit(images, captions[:8])
        pipe = RenderingPipe(items, blank={items[4].caption})
        assert checker_passes(pipe, items, steps=20, batch=4, checker=pool) == [1, 1, 1, 1, 0, 1, 1, 1, 1]
    finally:
        pool.close()


def test_shapes_items_paraphrase_every_third_caption_of_the_split():
    from pixforge.eval.bench import shapes_items
    from pixforge.shapes.world import WorldConfig, sample

    items = shapes_items(6, "test")
    assert [item.split for item in items] == ["test"] * 6
    assert [item.caption for item in items] == [
        sample(i, "test", WorldConfig(paraphrase=i % 3 == 2)).caption for i in range(6)]


def test_stored_no_cache_verdicts_only_for_the_same_prompts(tmp_path):
    import json

    import pytest

    from pixforge.eval.bench import stored_no_cache_verdicts

    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"steps": 20, "split": "validation", "first_prompt": 30,
                                "rows": [{"policy": "fora:2", "passed": "000"}, {"policy": "none", "passed": "101"}]}))
    assert stored_no_cache_verdicts(path, 3, 20, "validation", 30) == [1, 0, 1]
    assert stored_no_cache_verdicts(path, 2, 20, "validation", 30) == [1, 0]  # the first prompts of the stored run
    for other in [(4, 20, "validation", 30), (3, 10, "validation", 30), (3, 20, "test", 30), (3, 20, "validation", 0)]:
        with pytest.raises(SystemExit, match="needs a 'none' row scored on"):
            stored_no_cache_verdicts(path, *other)
    ablation = tmp_path / "ablate.json"  # cache_ablate.py names its rows "variant"; old cache.py files: test from 0
    ablation.write_text(json.dumps({"steps": 20, "rows": [{"variant": "none", "passed": "01"}]}))
    assert stored_no_cache_verdicts(ablation, 2, 20, "test", 0) == [0, 1]


def test_checker_workers_start_beside_a_gpu_only(monkeypatch):
    import os

    from pixforge.eval.shapes import default_check_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert (default_check_workers("cuda"), default_check_workers("cpu")) == (14, 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert default_check_workers("cuda") == 0
