"""Training throughput of the transformer: samples/s, GFLOP/s and MFU per config and precision.

    python benchmarks/train_throughput.py                         # shapes-tiny, shapes-10m, B/2-class
    python benchmarks/train_throughput.py --presets shapes-10m --precisions fp32,bf16 --compile

One training step = forward + backward + AdamW on synthetic latents and text (the real
loop reads both from the feature cache, so this is the model's cost). FLOPs are the
analytic forward count x 3. MFU = achieved GFLOP/s over the machine's GEMM rate in the
same precision, measured in the same run. Median of --repeats timed steps after warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pixforge.models.flops import count_parameters, forward_flops
from pixforge.models.precision import gemm_rate
from pixforge.models.presets import get_preset
from pixforge.models.transformer import PixArtTransformer
from pixforge.train.config import TrainConfig
from pixforge.train.loop import ddpm_schedule, diffusion_loss

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def bench(preset: str, precision: str, batch: int, text_tokens: int, image: int, repeats: int, compile_model: bool):
    config = get_preset(preset)
    # B/2 reads 4096-d T5 captions; the shapes presets read 384-d MiniLM ones.
    model = PixArtTransformer(config).initialize_weights().train()
    step_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = ddpm_schedule()
    train_config = TrainConfig(target="vae")
    latent = image // 8
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 4, latent, latent, generator=g)
    text = torch.randn(batch, text_tokens, config.caption_channels, generator=g)
    mask = torch.ones(batch, text_tokens, dtype=torch.long)
    dtype = DTYPES[precision]

    def step():
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = diffusion_loss(step_model, schedule, x0, text, mask, t, noise, train_config)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2 if not compile_model else 3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    flops = 3 * forward_flops(config, image, image, text_tokens, batch)["total"]
    median = statistics.median(times)
    return count_parameters(config), batch / median, flops / median / 1e9, median, min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="shapes-tiny,shapes-4m,shapes-10m,B/2")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image", type=int, default=128)
    parser.add_argument("--text-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    peak = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    print(f"threads {torch.get_num_threads()}; GEMM peak fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    header = f"{'preset':<12} {'params':>8} {'prec':>5} {'compile':>7} {'samples/s':>9} {'GFLOP/s':>8} {'MFU':>5} {'step s (min-max)':>18}"
    print(header)
    print("-" * len(header))
    for preset in args.presets.split(","):
        for precision in args.precisions.split(","):
            for compiled in ([False, True] if args.compile else [False]):
                params, rate, gflops, median, low, high = bench(
                    preset, precision, args.batch, args.text_tokens, args.image, args.repeats, compiled
                )
                print(f"{preset:<12} {params / 1e6:>7.1f}M {precision:>5} {str(compiled):>7} {rate:>9.1f} {gflops:>8.1f} "
                      f"{100 * gflops / peak[precision]:>4.0f}% {median:>7.3f} ({low:.3f}-{high:.3f})")


if __name__ == "__main__":
    main()
