"""Transformer forward: pixforge vs diffusers on the same random weights.

    python benchmarks/transformer_forward.py                      # XL/2, 256² and 512², batch 2
    python benchmarks/transformer_forward.py --preset B/2 --repeats 5 --sizes 256

Prints one row per (size, precision, implementation): median / min / max seconds over
`--repeats` runs (after one warm-up), achieved GFLOP/s (analytic FLOPs, 2 per MAC), and the
ratio to diffusers in the same precision. Runs are interleaved (ours, diffusers, ours, ...)
so background load hits both alike. Also prints the machine's fp32 and bf16 GEMM rates and
what precision="auto" picks, with the auto forward as a fraction of the best GEMM rate.
"""
from __future__ import annotations

import argparse
import statistics
import torch

from pixforge.eval.bench import interleaved
from pixforge.models.convert import diffusers_to_pixforge
from pixforge.models.flops import forward_flops
from pixforge.models.precision import auto_precision, measure_precisions
from pixforge.models.presets import get_preset
from pixforge.models.transformer import PixArtTransformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_models(preset: str):
    import diffusers

    config = get_preset(preset)
    torch.manual_seed(0)
    fields = {k: v for k, v in config.to_dict().items() if not k.startswith("kv_compress") and k != "qk_norm"}
    reference = diffusers.PixArtTransformer2DModel(**fields).eval()
    ours = PixArtTransformer(config).eval()
    ours.load_state_dict(diffusers_to_pixforge(reference.state_dict()))
    return config, reference, ours


def make_inputs(config, size: int, batch: int, text_tokens: int, real_tokens: int):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, config.in_channels, size // 8, size // 8, generator=g)
    text = torch.randn(batch, text_tokens, config.caption_channels, generator=g)
    mask = torch.zeros(batch, text_tokens, dtype=torch.long)
    mask[:, :real_tokens] = 1
    timestep = torch.full((batch,), 500)
    return latents, timestep, text, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="XL/2")
    parser.add_argument("--sizes", default="256,512", help="comma-separated square image sizes in pixels")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=120)
    parser.add_argument("--real-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    rates = measure_precisions()
    choice = auto_precision()
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"GEMM 512x1152 @ 1152x4608: fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s; auto -> {choice}")
    config, reference, ours = build_models(args.preset)
    rows = []
    for precision in args.precisions.split(","):
        dtype = DTYPES[precision]
        reference.to(dtype)
        ours.to(dtype)
        for size in (int(s) for s in args.sizes.split(",")):
            latents, timestep, text, mask = make_inputs(config, size, args.batch, args.text_tokens, args.real_tokens)
            latents, text = latents.to(dtype), text.to(dtype)
            flops = forward_flops(config, size, size, args.text_tokens, args.batch)
            context = ours.prepare_text(text, mask)
            runs = {
                "diffusers": lambda: reference(latents, encoder_hidden_states=text, timestep=timestep,
                                               encoder_attention_mask=mask, return_dict=False),
                "pixforge": lambda: ours(latents, timestep, text, mask),
                "pixforge, cached text": lambda: ours(latents, timestep, text_context=context),
            }
            times = interleaved(runs, args.repeats)
            base = statistics.median(times["diffusers"])
            for name, values in times.items():
                median = statistics.median(values)
                work = flops["total_cached_text"] if "cached" in name else flops["total"]
                rows.append((size, precision, name, median, min(values), max(values), work / median / 1e9, base / median))
    print()
    header = f"{'size':>5} {'prec':>5} {'implementation':<22} {'median s':>9} {'min s':>8} {'max s':>8} {'GFLOP/s':>8} {'vs diffusers':>12}"
    print(header)
    print("-" * len(header))
    for size, precision, name, median, low, high, gflops, ratio in rows:
        print(f"{size:>5} {precision:>5} {name:<22} {median:>9.3f} {low:>8.3f} {high:>8.3f} {gflops:>8.1f} {ratio:>11.2f}x")
    best_gemm = max(rates.values())
    largest = max(int(s) for s in args.sizes.split(","))
    auto_rows = [r for r in rows if r[0] == largest and r[1] == choice and r[2] == "pixforge, cached text"]
    if auto_rows:
        print(f"\nprecision=auto ({choice}) at {largest}²: {auto_rows[0][6]:.0f} GFLOP/s = "
              f"{100 * auto_rows[0][6] / best_gemm:.0f}% of the best GEMM rate ({best_gemm:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
