"""checker_passes: every policy compared sees the same prompts and seeds, chunk by chunk."""
from types import SimpleNamespace

from pixforge.eval.bench import checker_passes
from pixforge.shapes.world import WorldConfig, sample


class RenderingPipe:
    """Stands in for a pipeline: returns each prompt's own clean render (the checker passes it),
    or a blank canvas for prompts listed in `blank`; records how it was called."""

    def __init__(self, items, blank=()):
        self.renders = {item.caption: item.image for item in items}
        self.blank, self.calls = set(blank), []

    def __call__(self, prompts, num_inference_steps, seed, progress, cache):
        self.calls.append((len(prompts), seed, num_inference_steps, cache))
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


def test_shapes_items_paraphrase_every_third_caption_of_the_split():
    from pixforge.eval.bench import shapes_items
    from pixforge.shapes.world import WorldConfig, sample

    items = shapes_items(6, "test")
    assert [item.split for item in items] == ["test"] * 6
    assert [item.caption for item in items] == [
        sample(i, "test", WorldConfig(paraphrase=i % 3 == 2)).caption for i in range(6)]
