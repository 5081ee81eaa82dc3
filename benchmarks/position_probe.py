"""Does the model read the relation word? Each test-split position caption is generated twice
with the same seed: as written, and with the relation turned round ("left of" → "right of",
"above" → "below"; the objects stay in the same order). The shapes checker finds the two
objects; the relation the image *shows* is the dominant axis and sign of their centre offset.

    python benchmarks/position_probe.py src/pixforge/assets/default --n 100

Reported: how often both objects are found once each, the confusion between the asked and the
shown relation (a model that ignores the word shows the same distribution for every row), the
relation accuracy given both objects, and how often turning the word round turns the layout
round (1.0 = the word decides the layout; ~0 = the layout does not depend on it).

A continuous signal beside it, for runs where no layout turns yet (`relation_effect`): at a
few high-noise timesteps, the model's x0 prediction from the same noise for the caption as
written and turned round, RMS of their difference over the RMS difference to another caption's
prediction. ~0: the relation word leaves the layout-deciding prediction unchanged; a model that
reads it moves the objects and lands near what a different caption changes.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from pixforge.eval.shapes import detect, relation_holds
from pixforge.shapes.world import OPPOSITE_RELATION, RELATIONS, CaptionSpec, WorldConfig, canonical_caption, sample

SHOWN = RELATIONS + ("missing",)


def position_specs(n: int) -> list[CaptionSpec]:
    """The first n test-split position scenes' specs (the probes' fixed caption set)."""
    config = WorldConfig(mix=(("position", 1.0),))
    return [sample(i, "test", config).scene.spec() for i in range(n)]


def turned(spec: CaptionSpec) -> CaptionSpec:
    """The same caption with its relation turned round, the objects in the same order."""
    return CaptionSpec(spec.groups, OPPOSITE_RELATION[spec.relation], spec.background)


def shown_relation(found, spec: CaptionSpec) -> tuple[str, tuple | None]:
    """The relation the image shows between the caption's first and second object, by the
    dominant axis of their centre offset, with that pair; "missing" (and None) unless each is
    found exactly once."""
    first, second = spec.groups[0], spec.groups[1]
    a = [o for o in found if (o.color, o.shape) == (first.color, first.shape)]
    b = [o for o in found if (o.color, o.shape) == (second.color, second.shape)]
    if len(a) != 1 or len(b) != 1:
        return "missing", None
    dx, dy = a[0].center[0] - b[0].center[0], a[0].center[1] - b[0].center[1]
    if abs(dx) >= abs(dy):
        return ("left of" if dx < 0 else "right of"), (a[0], b[0])
    return ("above" if dy < 0 else "below"), (a[0], b[0])


def probe(pipe, n: int, cfg: float, steps: int = 20, batch: int = 16) -> dict:
    specs = position_specs(n)
    asked, shown, holds = [], [], []
    flips = []
    for first in range(0, n, batch):
        chunk = specs[first:first + batch]
        outcome = {}
        for name, group in (("as written", chunk), ("turned", [turned(s) for s in chunk])):
            result = pipe([canonical_caption(s) for s in group], height=128, width=128, num_inference_steps=steps,
                          guidance_scale=cfg, seed=first, progress=False)
            outcome[name] = []
            for spec, image in zip(group, result.images):
                _, found = detect(image)
                relation, pair = shown_relation(found, spec)
                ok = pair is not None and relation_holds(*pair, spec.relation, 128, 128)
                asked.append(spec.relation)
                shown.append(relation)
                holds.append(ok)
                outcome[name].append(relation)
        for a, b in zip(outcome["as written"], outcome["turned"]):
            if a != "missing" and b != "missing":
                flips.append(b == OPPOSITE_RELATION[a])
    confusion = {r: Counter() for r in RELATIONS}
    for a, s in zip(asked, shown):
        confusion[a][s] += 1
    present = [s != "missing" for s in shown]
    correct_given_present = [h for h, p in zip(holds, present) if p]
    return {
        "n_captions": len(asked), "cfg": cfg, "steps": steps,
        "both_found": sum(present) / len(present),
        "relation_correct_given_found": sum(correct_given_present) / max(len(correct_given_present), 1),
        "shown_matches_asked_given_found": sum(a == s for a, s in zip(asked, shown) if s != "missing")
        / max(sum(present), 1),
        "pairs_with_both_found": len(flips),
        "layout_turns_with_word": sum(flips) / max(len(flips), 1),
        "confusion": {a: {s: confusion[a][s] for s in SHOWN} for a in RELATIONS},
    }


def relation_effect(pipe, n: int, timesteps=(950, 850, 750, 650), batch: int = 16) -> dict[str, float]:
    """Per timestep: RMS(x0(written) - x0(turned)) / RMS(x0(written) - x0(other caption)), the x0
    predictions conditional only (no guidance), from one pure-noise input (signal 0) per caption."""
    from pixforge.sampling import samplers as S
    from pixforge.sampling.pipeline import encode_prompts, guided_model_fn, micro_conditions

    specs = position_specs(n)
    written = [canonical_caption(s) for s in specs]
    turned_round = [canonical_caption(turned(s)) for s in specs]
    other = written[1:] + written[:1]
    schedule = S.noise_schedule(pipe.schedule)
    latent = pipe.vae_scale_factor
    shape = (pipe.transformer.config.in_channels, 128 // latent, 128 // latent)
    sums = {t: [0.0, 0.0] for t in timesteps}
    for first in range(0, n, batch):
        size = len(written[first:first + batch])
        noise = torch.randn((size, *shape), generator=torch.Generator().manual_seed(first))
        resolution = aspect = None
        if pipe.transformer.config.uses_micro_conditions:
            resolution, aspect = micro_conditions(128, 128, size, "cpu")
        models = []
        for captions in (written, turned_round, other):
            text = encode_prompts(pipe.text_encoder, captions[first:first + size], None, pipe.max_sequence_length)
            context = pipe.transformer.prepare_text(text.embeds, text.mask)
            models.append(guided_model_fn(pipe.transformer, context, 1.0, shape[0], resolution, aspect,
                                          prediction_type=pipe.prediction_type, schedule=pipe.schedule))
        for t in timesteps:
            step = torch.tensor(float(t))
            alpha_bar = float(S.alpha_bar_at(schedule, step))
            x = (1 - alpha_bar) ** 0.5 * noise
            x0 = [(x - (1 - alpha_bar) ** 0.5 * model(x, step)) / alpha_bar ** 0.5 for model in models]
            sums[t][0] += float((x0[0] - x0[1]).pow(2).sum())
            sums[t][1] += float((x0[0] - x0[2]).pow(2).sum())
    return {str(t): (a / b) ** 0.5 for t, (a, b) in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--n", type=int, default=100, help="position captions (each generated twice)")
    parser.add_argument("--cfg", type=float, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    from t2i_progress import load

    pipe, _ = load(args.path, 24)
    cfg = pipe.guidance_scale if args.cfg is None else args.cfg
    result = probe(pipe, args.n, cfg, args.steps)
    result["relation_effect"] = relation_effect(pipe, args.n)
    print(f"{args.path}: {result['n_captions']} position captions ({args.n} as written + turned round), cfg {cfg}")
    print(f"  both objects found once: {100 * result['both_found']:.1f}%")
    print(f"  relation holds (checker rule), given both found: {100 * result['relation_correct_given_found']:.1f}%")
    print(f"  shown relation = asked, given both found: {100 * result['shown_matches_asked_given_found']:.1f}% "
          f"(25% = chance over four)")
    print(f"  layout turns round with the word: {100 * result['layout_turns_with_word']:.1f}% "
          f"of {result['pairs_with_both_found']} pairs")
    print("  relation effect on x0 at t (turned / other caption): "
          + ", ".join(f"{t}: {v:.3f}" for t, v in result["relation_effect"].items()))
    print("  asked \\ shown  " + "  ".join(f"{s:>8}" for s in SHOWN))
    for asked, row in result["confusion"].items():
        print(f"  {asked:<14}" + "  ".join(f"{row[s]:>8}" for s in SHOWN))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
