"""Can the relation of a position caption be imposed at sampling time, without training?

The shipped model draws both objects of a position caption (~92%) but puts them where the
initial noise puts them: the relation word does not move them (docs/training.md,
`position_probe.py`). This benchmark measures four training-free ways to impose the layout
on the default model, each on the same test-split position captions and seeds as a plain
generation (CFG 2.5, 20 dpm++ steps), relation read by the shapes checker:

- `attention`: an additive cross-attention bias for the first K steps: +W where an image
  token lies in its object's half of the image and the text token belongs to that object's
  noun phrase, −W where it lies outside (DenseDiffusion-style attention modulation).
- `regional`: for the first K steps the conditional ε is composed region-wise from the two
  noun phrases prompted alone ("a red circle", "a blue square"): each phrase's ε in its half
  (MultiDiffusion / LMD-style regional prompting); the rest of the steps are plain.
  Variants: `feather` (a linear ramp across the dividing line instead of a hard edge) and
  `anneal` (the composition's weight falls linearly over the K steps).
- `select`: the eight D4 transforms of the seed's noise (rotations, flips — each is as valid
  a Gaussian draw), each run 5 plain steps; the one whose full-prompt ε at step 5 agrees best
  with the region-wise composition is kept, then `regional` for K steps.
- `planted`: the scene's own render, VAE-encoded, planted in x_T at the first timestep's
  signal level × S, then sampled with the relation turned round: does the layout come from
  the tiny signal in x_T (a non-zero terminal SNR leak) or from the caption?

    python benchmarks/position_steering.py --n 100 --out benchmarks/results/position_steering.json
    python benchmarks/position_steering.py --n 160 --arms "plain,regional K=12 feather 0.25"   # some arms

Cost per image relative to a plain generation: attention ~1.0, regional 1 + K/20, select
~3.6 (8 × 5 probe steps with the two phrases) — none of them is in the product.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from position_probe import shown_relation  # benchmarks/ is the script's folder

from pixforge.eval.shapes import detect, relation_holds
from pixforge.models.transformer import TextContext
from pixforge.sampling import samplers as S
from pixforge.sampling.pipeline import (
    decode, encode_prompts, guided_model_fn, load_pipeline, prepare_noise, to_numpy, to_pil,
)
from pixforge.sampling.regions import RELATION_HALVES, box_mask, compose
from pixforge.shapes.world import (
    OPPOSITE_RELATION, RELATION_PHRASES, CaptionSpec, WorldConfig, canonical_caption, sample,
)

GRID_TOKENS = 8  # 128² → 16² latent → 8² tokens (patch 2)
LATENT = 16
STOP_TOKENS = {"[CLS]", "[SEP]", "a", "an", "the"}


def half_masks(relation: str, size: int, feather: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(size, size) masks of the first and second object's half for `relation` (the boxes
    `layout="auto"` uses). `feather` > 0: a linear ramp across the dividing line, that
    fraction of the image wide (the two masks still sum to 1 everywhere)."""
    hard = tuple(box_mask(box, size, size) for box in RELATION_HALVES[relation])
    if feather <= 0:
        return hard
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    ramp = ((0.5 - centres) / feather + 0.5).clamp(0, 1)  # 1 before the middle, 0 after
    first_before = bool(hard[0][0, 0] > 0)  # the first object's half holds the (0, 0) corner
    if relation in ("left of", "right of"):
        soft = ramp[None, :].expand(size, size)
    else:
        soft = ramp[:, None].expand(size, size)
    soft = soft if first_before else 1 - soft
    return soft.clone(), (1 - soft).clone()


def phrase_prompts(spec: CaptionSpec) -> tuple[str, str]:
    """Each object prompted alone, with the caption's background."""
    return tuple(canonical_caption(CaptionSpec((g,), None, spec.background)) for g in spec.groups)


def phrase_token_masks(pipe, spec: CaptionSpec, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L,) masks of the tokens of the first and second noun phrase of the canonical caption."""
    caption = canonical_caption(spec)
    first = canonical_caption(CaptionSpec(spec.groups[:1], None, None))
    second = canonical_caption(CaptionSpec(spec.groups[1:], None, None))
    start2 = len(first) + len(RELATION_PHRASES[spec.relation]) + 2
    assert caption[start2:start2 + len(second)] == second, caption
    spans = ((0, len(first)), (start2, start2 + len(second)))
    encoding = pipe.text_encoder.tokenizer.encode(caption)
    masks = (torch.zeros(length), torch.zeros(length))
    for index, ((a, b), token) in enumerate(zip(encoding.offsets, encoding.tokens)):
        if index >= length or b <= a or token in STOP_TOKENS:  # padding has empty offsets
            continue
        for mask, (lo, hi) in zip(masks, spans):
            if a >= lo and b <= hi:
                mask[index] = 1
    return masks


def d4(noise: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for turns in range(4):
        rotated = torch.rot90(noise, turns, dims=(-2, -1))
        out += [rotated, rotated.flip(-1)]
    return out


class Batch:
    """One batch of position captions: contexts for [uncond, caption, phrase 1, phrase 2]."""

    def __init__(self, pipe, specs: list[CaptionSpec], captions: list[str], cfg: float, plan, feather: float = 0.0):
        self.pipe, self.specs, self.cfg, self.plan = pipe, specs, cfg, plan
        size = len(specs)
        phrases = [phrase_prompts(s) for s in specs]
        texts = [""] * size + captions + [p[0] for p in phrases] + [p[1] for p in phrases]
        text = encode_prompts(pipe.text_encoder, texts, None, pipe.max_sequence_length)
        self.length = text.mask.shape[1]
        self.context = pipe.transformer.prepare_text(text.embeds, text.mask)
        self.plain_context = TextContext([(k[:2 * size], v[:2 * size]) for k, v in self.context.kv],
                                         self.context.bias[:2 * size])
        steps = plan.timesteps
        self.all_fn = guided_model_fn(pipe.transformer, self.context, 1.0, 4, schedule=pipe.schedule, timesteps=steps)
        self.plain_fn = guided_model_fn(pipe.transformer, self.plain_context, cfg, 4, schedule=pipe.schedule,
                                        timesteps=steps)
        masks = [half_masks(s.relation, LATENT, feather) for s in specs]
        self.masks = torch.stack([torch.stack(m) for m in masks], dim=1)[:, :, None]  # (2, B, 1, h, w)

    def branches(self, x, t):
        return self.all_fn(torch.cat([x, x, x, x]), t).chunk(4)  # uncond, caption, phrase 1, phrase 2

    def regional_fn(self, k: int, anneal: bool = False, regional_cfg: float | None = None):
        """Regional for the first k steps; `anneal`: the composition's weight falls linearly
        from 1 at the first step to 1/k at the k-th (the whole caption's ε takes the rest);
        `regional_cfg`: the guidance scale during those steps (default: the run's)."""
        calls = [0]

        def model_fn(x, t):
            step = calls[0]
            calls[0] += 1
            if step >= k:
                return self.plain_fn(x, t)
            uncond, caption, first, second = self.branches(x, t)
            composed = compose(caption, torch.stack([first, second]), self.masks)
            if anneal:
                weight = 1 - step / k
                composed = weight * composed + (1 - weight) * caption
            return uncond + (self.cfg if regional_cfg is None else regional_cfg) * (composed - uncond)

        return model_fn

    def attention_fn(self, weight: float, k: int):
        size = len(self.specs)
        bias = self.plain_context.bias.expand(2 * size, 1, GRID_TOKENS**2, self.length).clone()
        for row, spec in enumerate(self.specs):
            tokens = phrase_token_masks(self.pipe, spec, self.length)
            for region, token_mask in zip(half_masks(spec.relation, GRID_TOKENS), tokens):
                sign = region.flatten() * 2 - 1  # +1 inside, −1 outside
                bias[size + row, 0] += weight * sign[:, None] * token_mask[None, :]
        steered = TextContext(self.plain_context.kv, bias)
        steered_fn = guided_model_fn(self.pipe.transformer, steered, self.cfg, 4, schedule=self.pipe.schedule,
                                     timesteps=self.plan.timesteps)
        calls = [0]

        def model_fn(x, t):
            step = calls[0]
            calls[0] += 1
            return (steered_fn if step < k else self.plain_fn)(x, t)

        return model_fn

    def select_noise(self, noise: torch.Tensor, generators, probe_steps: int = 5) -> torch.Tensor:
        """Per image, the D4 transform of `noise` whose step-`probe_steps` full-prompt ε is closest
        to the region-wise composition of the phrases' ε."""

        class Stop(Exception):
            pass

        scores, candidates = [], d4(noise)
        for candidate in candidates:
            calls, box = [0], {}

            def model_fn(x, t):
                step = calls[0]
                calls[0] += 1
                if step == probe_steps:
                    box["eps"] = self.branches(x, t)
                    raise Stop
                return self.plain_fn(x, t)

            try:
                S.denoise(self.plan, model_fn, candidate, generators)
            except Stop:
                pass
            _, caption, first, second = box["eps"]
            composed = compose(caption, torch.stack([first, second]), self.masks)
            scores.append((caption - composed).pow(2).flatten(1).sum(1))
        best = torch.stack(scores).argmin(0)
        return torch.stack([candidates[int(best[i])][i] for i in range(len(best))])


def run_arm(pipe, arm: dict, n: int, cfg: float, batch: int = 16, start_index: int = 0) -> dict:
    config = WorldConfig(mix=(("position", 1.0),))
    plan = S.plan_sampling("dpm++", 20, pipe.schedule)
    alpha_bar = float(S.alpha_bar_at(S.noise_schedule(pipe.schedule), plan.timesteps[0]))
    holds, found_both, follows_render, follows_caption = [], [], 0, 0
    start = time.perf_counter()
    for first in range(start_index, start_index + n, batch):
        samples = [sample(i, "test", config) for i in range(first, min(start_index + n, first + batch))]
        specs = [s.scene.spec() for s in samples]
        asked = specs
        if arm["kind"] == "planted":  # sample with the relation turned round
            asked = [CaptionSpec(s.groups, OPPOSITE_RELATION[s.relation], s.background) for s in specs]
        with torch.inference_mode():
            work = Batch(pipe, asked, [canonical_caption(s) for s in asked], cfg, plan, arm.get("feather", 0.0))
            _, generators = pipe._generators(first, None, len(specs))
            noise = prepare_noise((len(specs), 4, LATENT, LATENT), generators)
            model_fn = work.plain_fn
            if arm["kind"] == "attention":
                model_fn = work.attention_fn(arm["weight"], arm["steps"])
            elif arm["kind"] == "regional":
                model_fn = work.regional_fn(arm["steps"], arm.get("anneal", False), arm.get("cfg"))
            elif arm["kind"] == "select":
                noise = work.select_noise(noise, generators)
                model_fn = work.regional_fn(arm["steps"])
            elif arm["kind"] == "planted":
                pixels = np.stack([np.asarray(s.image.convert("RGB"), dtype=np.float32) / 127.5 - 1 for s in samples])
                latents = pipe.vae.scale_latents(pipe.vae.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2)).mean)
                noise = arm["scale"] * alpha_bar**0.5 * latents + (1 - alpha_bar) ** 0.5 * noise
            images = to_pil(to_numpy(decode(pipe.vae, S.denoise(plan, model_fn, noise, generators))))
        for spec, image in zip(specs, images):
            _, found = detect(image)
            relation, pair = shown_relation(found, spec)
            found_both.append(pair is not None)
            holds.append(pair is not None and relation_holds(*pair, spec.relation, 128, 128))
            if arm["kind"] == "planted" and pair is not None:
                follows_render += relation == spec.relation
                follows_caption += relation == OPPOSITE_RELATION[spec.relation]
    result = {**arm, "n": n, "relation_correct": float(np.mean(holds)), "both_found": float(np.mean(found_both)),
              "seconds": round(time.perf_counter() - start, 1), "holds": [bool(h) for h in holds]}
    if arm["kind"] == "planted":
        result |= {"follows_render": follows_render, "follows_turned_caption": follows_caption}
    return result


ARMS = [
    {"name": "plain", "kind": "plain"},
    {"name": "attention W=3 K=6", "kind": "attention", "weight": 3.0, "steps": 6},
    {"name": "attention W=8 K=6", "kind": "attention", "weight": 8.0, "steps": 6},
    {"name": "regional K=6", "kind": "regional", "steps": 6},
    {"name": "regional K=12", "kind": "regional", "steps": 12},
    {"name": "regional K=14", "kind": "regional", "steps": 14},
    {"name": "regional K=16", "kind": "regional", "steps": 16},
    {"name": "regional K=12 feather 0.25", "kind": "regional", "steps": 12, "feather": 0.25},
    {"name": "regional K=14 feather 0.25", "kind": "regional", "steps": 14, "feather": 0.25},
    {"name": "regional K=16 feather 0.25", "kind": "regional", "steps": 16, "feather": 0.25},
    {"name": "regional K=20 annealed", "kind": "regional", "steps": 20, "anneal": True},
    {"name": "regional K=12 CFG 4", "kind": "regional", "steps": 12, "cfg": 4.0},
    {"name": "regional K=12 CFG 6", "kind": "regional", "steps": 12, "cfg": 6.0},
    {"name": "regional K=16 annealed", "kind": "regional", "steps": 16, "anneal": True},
    {"name": "select + regional K=6", "kind": "select", "steps": 6},
    {"name": "select + regional K=12", "kind": "select", "steps": 12},
    {"name": "planted x1 turned caption", "kind": "planted", "scale": 1.0},
    {"name": "planted x30 turned caption", "kind": "planted", "scale": 30.0},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    parser.add_argument("--n", type=int, default=100, help="test-split position captions")
    parser.add_argument("--first", type=int, default=0, help="index of the first caption (seeds follow it)")
    parser.add_argument("--cfg", type=float, default=None)
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = load_pipeline(args.model)
    cfg = pipe.guidance_scale if args.cfg is None else args.cfg
    arms = ARMS if args.arms is None else [a for a in ARMS if a["name"] in args.arms.split(",")]
    results, base = [], None
    for arm in arms:
        result = run_arm(pipe, arm, args.n, cfg, start_index=args.first)
        if arm["kind"] == "plain":
            base = np.array(result["holds"], dtype=float)
        elif base is not None and arm["kind"] != "planted":
            diff = np.array(result["holds"], dtype=float) - base
            result["paired_delta"] = float(diff.mean())
            result["paired_se"] = float(diff.std(ddof=1) / len(diff) ** 0.5)
        line = (f"{arm['name']:<30} relation right {100 * result['relation_correct']:5.1f}%  "
                f"both found {100 * result['both_found']:5.1f}%  ({result['seconds']:.0f} s)")
        if "paired_delta" in result:
            line += f"  vs plain {100 * result['paired_delta']:+.1f} ± {100 * result['paired_se']:.1f}"
        if "follows_render" in result:
            line += f"  layout of the render {result['follows_render']}, of the caption {result['follows_turned_caption']}"
        print(line, flush=True)
        results.append(result)
    if args.out:
        Path(args.out).write_text(json.dumps({"cfg": cfg, "n": args.n, "arms": results}, indent=1))


if __name__ == "__main__":
    main()
