"""Does a trainable text refiner let a fine-tune bind the relation word? (docs/training.md)

The shipped model ignores "left of" / "above" (benchmarks/position_probe.py). MiniLM's token
embeddings carry the relation into the object words only faintly: the "red" of "a red circle
to the left of a blue square" and of "... to the right of ..." have cosine 0.9985. Placing an
object by the relation needs (object order x relation word), a product that cross-attention's
bilinear scores cannot form from a sum in the image stream; a few self-attention layers over
the caption tokens (zero-initialised residual, so training starts from the shipped model
exactly) could form it on the text side, where a query at a position then only needs a
bilinear match. This runs the two arms on the same data order and seeds — a plain fine-tune
of the shipped transformer and the same plus the refiner — and probes both:

    python benchmarks/position_refiner.py train --arm plain --out runs/refx/plain --minutes 35 --threads 1 &
    python benchmarks/position_refiner.py train --arm refiner --out runs/refx/refiner --minutes 35 --threads 1
    python benchmarks/position_refiner.py probe runs/refx/refiner.pt --n 100
    python benchmarks/position_refiner.py negative --n 100      # CFG against the turned caption

The first `train` builds the feature cache (12k samples, position 6 : counting 1 : others 1,
~11 min on 2 cores); run it alone once with --prepare-only. Out of tree on purpose: the refiner is
not part of the PixArt-α architecture the default model ships in.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # position_probe
FEATURES = Path("runs/refx/feature_cache")


class Refiner(nn.Module):
    """Pre-norm self-attention + MLP layers over the caption tokens, residual outputs zeroed."""

    def __init__(self, dim: int = 384, layers: int = 2, heads: int = 6):
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.norm1, block.qkv, block.out = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            block.norm2, block.fc1, block.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            for layer in (block.out, block.fc2):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            self.blocks.append(block)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        bias = torch.zeros(batch, 1, 1, n, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        for block in self.blocks:
            q, k, v = block.qkv(block.norm1(x)).reshape(batch, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(batch, n, dim)
            x = x + block.out(attended)
            x = x + block.fc2(F.gelu(block.fc1(block.norm2(x)), approximate="tanh"))
        return x


class Refined(nn.Module):
    def __init__(self, transformer, refiner: Refiner | None):
        super().__init__()
        self.transformer, self.refiner = transformer, refiner

    def forward(self, x, t, text, mask):
        return self.transformer(x, t, text if self.refiner is None else self.refiner(text, mask), mask)


def train(args) -> None:
    from pixforge.models.transformer import PixArtTransformer
    from pixforge.models.vae import AutoencoderKL
    from pixforge.train.config import TrainConfig
    from pixforge.train.data import BucketBatches, all_captions, dataset_for
    from pixforge.train.loop import (FeatureTable, build_text_encoder, ddpm_schedule, diffusion_loss, ema_update,
                                     feature_keys, load_latents, load_text_features, sample_timesteps)

    torch.set_num_threads(args.threads)
    config = TrainConfig(output_dir=str(FEATURES.parent), target="transformer", vae="src/pixforge/assets/default/vae",
                         model="src/pixforge/assets/default/transformer", text_encoder="minilm", max_text_tokens=24,
                         num_samples=args.samples, paraphrase=0.3, category_mix="position=6,counting=1", seed=11,
                         resolution=128, buckets=False, batch_size=32, lr=args.lr, loss_weighting="min-snr",
                         min_snr_gamma=5.0, caption_dropout=0.1, num_workers=2,
                         timestep_range=(args.timestep_low, 1000), x0_weight_floor=args.x0_floor)
    dataset = dataset_for(config)
    vae = AutoencoderKL.from_pretrained(config.vae).eval()
    encoder = build_text_encoder("minilm", 24, "cpu")
    text_key, latent_key = feature_keys(config, dataset)
    with torch.no_grad():
        text_features = load_text_features(FEATURES, text_key, lambda: all_captions(dataset, 2), encoder, 24)
        latents = load_latents(FEATURES, latent_key, dataset, vae, 2)
        null = encoder.encode([""], 24)
    if args.prepare_only:
        return
    null_text = (null.embeds[0].float(), null.mask[0])
    features = FeatureTable(latents, text_features, "cpu")
    torch.manual_seed(0)
    model = Refined(PixArtTransformer.from_pretrained(config.model).train(), Refiner() if args.arm == "refiner" else None)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    groups = [{"params": list(model.transformer.parameters()), "lr": args.lr}]
    if model.refiner is not None:
        groups.append({"params": list(model.refiner.parameters()), "lr": args.refiner_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    peak = [group["lr"] for group in optimizer.param_groups]
    schedule, generator = ddpm_schedule(), torch.Generator().manual_seed(123)
    batches = BucketBatches(tuple(dataset.buckets), config.batch_size, config.seed)
    epoch, position, step = 0, 0, 0
    order = batches.epoch(epoch)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(f"{out}.log", "w") as log:
        while time.time() - start < args.minutes * 60:
            if position >= len(order):
                epoch, position = epoch + 1, 0
                order = batches.epoch(epoch)
            indices = order[position]
            position += 1
            x0, text, mask = features.batch(indices)
            drop = torch.rand(len(indices), generator=generator) < config.caption_dropout
            text[drop], mask[drop] = null_text[0], null_text[1]
            t = sample_timesteps(len(indices), "uniform", generator, low=config.timestep_range[0],
                                 high=config.timestep_range[1])
            noise = torch.randn(x0.shape, generator=generator)
            for group, lr in zip(optimizer.param_groups, peak):
                group["lr"] = lr * min(1.0, (step + 1) / 100)
            loss = diffusion_loss(model, schedule, x0 * vae.config.scaling_factor, text, mask, t, noise, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            ema_update(ema, model, 0.995, step)
            step += 1
            if step % 25 == 0:
                print(step, round(time.time() - start), float(loss.detach()), file=log, flush=True)
        torch.save(ema.state_dict(), f"{out}.pt")
        print(f"done {step} steps, {step * config.batch_size} samples, {time.time() - start:.0f} s", file=log)


def probe_command(args) -> None:
    from position_probe import probe, relation_effect

    from pixforge.sampling.pipeline import load_pipeline

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(None)
    if args.weights != "shipped":
        state = torch.load(args.weights, weights_only=True)
        pipe.transformer.load_state_dict({k.removeprefix("transformer."): v for k, v in state.items()
                                          if k.startswith("transformer.")})
        refined = {k.removeprefix("refiner."): v for k, v in state.items() if k.startswith("refiner.")}
        if refined:
            refiner = Refiner().eval()
            refiner.load_state_dict(refined)
            prepare = pipe.transformer.prepare_text
            pipe.transformer.prepare_text = lambda text, mask=None: prepare(refiner(text.float(), mask), mask)
    result = probe(pipe, args.n, pipe.guidance_scale)
    result["relation_effect"] = relation_effect(pipe, args.n)
    print(args.weights, json.dumps({k: v for k, v in result.items() if k != "confusion"}))


def negative_command(args) -> None:
    """Guidance against the turned caption: the negative prompt is the caption with its relation
    turned round, so CFG amplifies exactly what the relation word changes (if anything)."""
    import numpy as np

    from position_probe import position_specs, shown_relation, turned

    from pixforge.eval.shapes import check
    from pixforge.sampling.pipeline import load_pipeline
    from pixforge.shapes.world import canonical_caption

    torch.set_grad_enabled(False)
    pipe = load_pipeline(None)
    specs = position_specs(args.n)
    for negative in ("empty", "turned"):
        passes, relation_right = [], []
        for first in range(0, args.n, 25):
            chunk = specs[first:first + 25]
            captions = [canonical_caption(s) for s in chunk]
            negatives = None if negative == "empty" else [canonical_caption(turned(s)) for s in chunk]
            result = pipe(captions, negative_prompt=negatives, num_inference_steps=20, guidance_scale=args.cfg,
                          seed=first, progress=False)
            for spec, caption, image in zip(chunk, captions, result.images):
                verdict = check(image, caption)
                passes.append(verdict.passed)
                shown, pair = shown_relation(verdict.found, spec)
                if pair is not None:
                    relation_right.append(shown == spec.relation)
        print(f"negative {negative} @ CFG {args.cfg}: pass {np.mean(passes):.3f}, relation right given both found "
              f"{np.mean(relation_right):.3f} (n={len(relation_right)})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train")
    t.add_argument("--arm", choices=["plain", "refiner"], required=True)
    t.add_argument("--out", required=True, help="writes OUT.pt (EMA weights) and OUT.log")
    t.add_argument("--minutes", type=float, default=35)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--samples", type=int, default=12000)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--refiner-lr", type=float, default=1e-3)
    t.add_argument("--prepare-only", action="store_true")
    t.add_argument("--timestep-low", type=int, default=0,
                   help="train on timesteps [LOW, 1000) only (e.g. 850: where the sampler sets the layout)")
    t.add_argument("--x0-floor", type=float, default=0.0,
                   help="floor on the x0-error weight (1.0 with --timestep-low 850: plain x0-MSE there)")
    p = commands.add_parser("probe")
    p.add_argument("weights", help="OUT.pt of a train run, or 'shipped'")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    g = commands.add_parser("negative", help="CFG against the caption with its relation turned round")
    g.add_argument("--n", type=int, default=100)
    g.add_argument("--cfg", type=float, default=2.5)
    args = parser.parse_args()
    {"train": train, "probe": probe_command, "negative": negative_command}[args.command](args)


if __name__ == "__main__":
    main()
