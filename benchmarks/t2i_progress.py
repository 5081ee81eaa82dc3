"""Compositional accuracy of a text-to-image run, from its newest EMA checkpoint or a
finished pipeline folder: the number to watch while the default model trains.

    python benchmarks/t2i_progress.py runs/t2i --n 48            # a run in progress
    python benchmarks/t2i_progress.py src/pixforge/assets/default --n 600 --paraphrased 0.33
    python benchmarks/t2i_progress.py src/pixforge/assets/default --split validation --n 600 --out base.json
    python benchmarks/t2i_progress.py runs/t2i-ft3 --split validation --n 600 --pair base.json

Test-split prompts by default (a fraction paraphrased, never seen in training), one image each,
seed = index, 20 dpm++ steps, CFG --cfg; scored by the shapes checker per category. `--split
validation --first F` scores validation prompts F.. instead (to choose between models without
looking at the test prompts); `--pair OTHER.json` prints the paired difference against another
run's stored verdicts on the same prompts and seeds.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from pixforge.eval.bench import evaluation_items, paired_delta
from pixforge.eval.shapes import check


def load(path: str, max_text_tokens: int, device: str = "cpu", vae_override: str | None = None,
         checkpoint: str | Path | None = None):
    """A pipeline from a finished folder, or from a run's newest checkpoint (or `checkpoint`),
    EMA weights, with the VAE and text length the run trained with."""
    from pixforge.models.text import MiniLMTextEncoder
    from pixforge.models.vae import AutoencoderKL
    from pixforge.sampling.pipeline import PixArtPipeline

    if (Path(path) / "checkpoints").is_dir():
        from pixforge.train.export import model_and_config_from_run

        transformer, step, config = model_and_config_from_run(path, checkpoint=checkpoint)  # one read
        vae = AutoencoderKL.from_pretrained(vae_override or config.vae)
        encoder = MiniLMTextEncoder.from_package(default_max_length=config.max_text_tokens)
        pipe = PixArtPipeline(transformer.to(device), vae.to(device), encoder.to(device),
                              max_sequence_length=config.max_text_tokens)
        pipe.prediction_type = config.prediction_type
        return pipe, step
    pipe = PixArtPipeline.from_pretrained(path, device=device)
    if vae_override:  # the same set-up the pipeline gives its own VAE
        pipe.vae = AutoencoderKL.from_pretrained(vae_override).to(device).eval().set_channels_last()
    return pipe, None


def evaluate(pipe, n: int, paraphrased: float, cfg: float, steps: int, batch: int = 16, fid: bool = False,
             layout: str | None = None, split: str = "test", first_prompt: int = 0) -> dict:
    items = evaluation_items(first_prompt, first_prompt + n, split, paraphrased)
    failures = []
    verdicts = []  # per prompt, in order: two runs on the same prompts and seeds can be paired
    generated = []
    start = time.time()
    for first in range(0, n, batch):
        chunk = items[first:first + batch]
        result = pipe([item.caption for item in chunk], height=128, width=128, num_inference_steps=steps,
                      guidance_scale=cfg, seed=first_prompt + first, progress=False, layout=layout)
        for item, image in zip(chunk, result.images):
            if fid:
                generated.append(image)
            outcome = check(image, item.caption)
            verdicts.append(int(outcome.passed))
            if not outcome.passed and len(failures) < 8:
                failures.append(f"{item.caption!r}: {outcome.reason}")
    categories = [item.scene.category for item in items]
    by_category = defaultdict(list)  # the per-category rates, from the per-prompt verdicts
    for category, verdict in zip(categories, verdicts):
        by_category[category].append(verdict)
    result = {"overall": sum(verdicts) / len(verdicts), "n": len(verdicts), "split": split,
              "first_prompt": first_prompt, "seconds": time.time() - start,
              "per_category": {k: sum(v) / len(v) for k, v in sorted(by_category.items())}, "failures": failures,
              "passed": verdicts, "categories": categories}
    if fid:  # in-domain FID/KID against the renders of the same test scenes
        from pixforge.eval.metrics import fid as fid_score, kid, load_feature_net

        net = load_feature_net()
        real = [item.image for item in items]
        result["fid"] = fid_score(real, generated, net)
        result["kid"] = kid(real, generated, net)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--paraphrased", type=float, default=0.33)
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's; 4.5 for a run)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-text-tokens", type=int, default=24)
    parser.add_argument("--out", default=None)
    parser.add_argument("--fid", action="store_true", help="also in-domain FID/KID vs the test renders")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--vae", default=None, help="decode with this VAE folder instead of the model's")
    parser.add_argument("--batch", type=int, default=16, help="prompts per generation call")
    parser.add_argument("--layout", default=None, help="regional prompting: auto | none (docs/generation.md)")
    parser.add_argument("--split", default="test", choices=("test", "validation"))
    parser.add_argument("--first", type=int, default=0, help="first prompt index of the split")
    parser.add_argument("--pair", default=None, help="another run's --out JSON on the same prompts: paired delta")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe, step = load(args.path, args.max_text_tokens, args.device, args.vae)
    if args.cfg is None:
        args.cfg = pipe.guidance_scale
    result = evaluate(pipe, args.n, args.paraphrased, args.cfg, args.steps, batch=args.batch, fid=args.fid,
                      layout=args.layout, split=args.split, first_prompt=args.first)
    result["step"] = step
    result["layout"] = args.layout or "none"
    where = f" (step {step})" if step is not None else ""
    print(f"{args.path}{where}: {100 * result['overall']:.1f}% of {result['n']} prompts pass "
          f"({result['seconds']:.0f} s, cfg {args.cfg})")
    for category, value in result["per_category"].items():
        print(f"  {category:<14} {100 * value:5.1f}%")
    if "fid" in result:
        print(f"  in-domain FID {result['fid']:.2f}, KID {result['kid'][0]:.4f} ± {result['kid'][1]:.4f} "
              f"(vs the renders of the same {result['n']} test scenes)")
    for line in result["failures"]:
        print("  fail:", line)
    if args.pair:
        other = json.loads(Path(args.pair).read_text())
        if (other.get("split", "test"), other.get("first_prompt", 0)) != (args.split, args.first) \
                or len(other["passed"]) < result["n"]:
            raise SystemExit(f"{args.pair} holds other prompts than this run; cannot pair")
        result["paired_vs"] = {"path": args.pair,
                               "delta": paired_delta(result["passed"], other["passed"][:result["n"]])}
        print(f"  vs {args.pair}: {result['paired_vs']['delta']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
