"""Train the shapes-world feature network used for in-domain FID/KID (docs/evaluation.md).

One command, deterministic, a few minutes on 2 CPU cores:

    python scripts/train_shapes_features.py --out src/pixforge/assets/shapes_features.safetensors
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.nn import functional as F

from pixforge.eval.metrics import MAX_COUNT, ShapesFeatureNet, prepare, to_uint8_batch
from pixforge.shapes import degrade as D
from pixforge.shapes.world import BACKGROUNDS, COLORS, SHAPES, SPLITS, WorldConfig, render, sample

CANVASES = ((128, 128), (144, 112), (112, 144), (160, 96), (96, 160))
PAIRS = [(c, s) for c in COLORS for s in SHAPES]


DEGRADATIONS = ("blur", "noise", "jpeg", "jitter")


def degraded(image, rng: np.random.Generator) -> tuple[object, np.ndarray]:
    """(image, strength of each degradation): clean 40% of the time, else one degradation or
    all four at a uniform strength (degrade.py's strength-1 settings)."""
    strengths = np.zeros(len(DEGRADATIONS), dtype=np.float32)
    choice = rng.integers(10)
    if choice < 4:
        return image, strengths
    s = float(rng.uniform(0.05, 1.0))
    if choice == 4:
        strengths[:] = s
        return D.degrade(image, s, rng), strengths
    kind = DEGRADATIONS[choice % 4]
    strengths[DEGRADATIONS.index(kind)] = s
    if kind == "blur":
        return D.gaussian_blur(image, s * D.DegradeConfig.blur_sigma), strengths
    if kind == "noise":
        return D.gaussian_noise(image, s * D.DegradeConfig.noise_std, rng), strengths
    if kind == "jpeg":
        return D.jpeg(image, round(95 - D.DegradeConfig.jpeg_quality_drop * s)), strengths
    c = D.DegradeConfig
    return D.color_jitter(image, c.brightness * s, c.contrast * s, c.saturation * s, c.hue * s, rng), strengths


def dataset(split: str, n: int, config: WorldConfig) -> tuple[torch.Tensor, ...]:
    """uint8 images (n, 3, 128, 128), counts (n, 24) in 0..4, background index (n,), degradation strengths (n, 4)."""
    images, counts, backgrounds = [], np.zeros((n, len(PAIRS)), dtype=np.int64), np.zeros(n, dtype=np.int64)
    strengths = np.zeros((n, len(DEGRADATIONS)), dtype=np.float32)
    for index in range(n):
        scene = sample(index, split, config).scene
        image, strengths[index] = degraded(render(scene), np.random.default_rng([SPLITS[split], index]))
        images.append(image)
        for obj in scene.objects:
            counts[index, PAIRS.index((obj.color, obj.shape))] += 1
        backgrounds[index] = list(BACKGROUNDS).index(scene.background)
    return to_uint8_batch(images), torch.from_numpy(counts), torch.from_numpy(backgrounds), torch.from_numpy(strengths)


def loss_and_accuracy(net, images, counts, backgrounds, strengths):
    count_logits, background_logits, strength_logits = net.heads(net.features(prepare(images)))
    # Summed over the 24 colour × shape pairs: a mean would drown each pair's signal in the zeros.
    count_loss = F.cross_entropy(count_logits.reshape(-1, MAX_COUNT + 1), counts.reshape(-1), reduction="sum")
    strength_loss = F.mse_loss(torch.sigmoid(strength_logits), strengths, reduction="sum")
    loss = (count_loss + 10.0 * strength_loss) / len(counts) + F.cross_entropy(background_logits, backgrounds)
    exact = (count_logits.argmax(-1) == counts).all(-1) & (background_logits.argmax(-1) == backgrounds)
    strength_error = (torch.sigmoid(strength_logits) - strengths).abs().mean()
    return loss, exact.float().mean(), strength_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="src/pixforge/assets/shapes_features.safetensors")
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--validation", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = WorldConfig(canvas_sizes=CANVASES, background_prob=0.3)
    start = time.perf_counter()
    train = dataset("train", args.train, config)
    validation = dataset("validation", args.validation, config)
    print(f"rendered {args.train} + {args.validation} images in {time.perf_counter() - start:.0f} s")

    net = ShapesFeatureNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (args.train // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(args.train, generator=generator)
        for step in range(args.train // args.batch_size):
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            loss, _, _ = loss_and_accuracy(net, *(t[batch] for t in train))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        net.eval()
        with torch.no_grad():
            val_loss, val_exact, val_strength_error = loss_and_accuracy(net, *validation)
        print(f"epoch {epoch + 1}: train loss {loss.item():.4f}  validation loss {val_loss.item():.4f}  "
              f"validation exact (all 24 counts + background) {100 * val_exact.item():.1f}%  "
              f"degradation strength error {val_strength_error.item():.3f}  "
              f"{time.perf_counter() - start:.0f} s", flush=True)

    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, args.out,
              metadata={"recipe": "scripts/train_shapes_features.py", "validation_exact": f"{val_exact.item():.4f}"})
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
