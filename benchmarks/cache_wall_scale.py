"""Do feature caching's MAC savings become wall-time savings at PixArt scale?

The shapes model (10M parameters, 64 tokens) is too small for that on a CPU: a reused step
still pays the per-block elementwise work and kernel launches (docs/acceleration.md). This
times the denoising loop of a PixArt-size transformer with random weights (real weights cannot
be downloaded here; the time of a forward does not depend on them) under each cache policy:
20 dpm++ steps with CFG (batch 2: uncond + cond), the sampler and the guidance exactly as the
pipeline runs them (`guided_model_fn` + `denoise`), no text encoder and no VAE.

    python benchmarks/cache_wall_scale.py --preset pixart-alpha-1024-ms --sizes 512,1024   # GPU, bf16
    python benchmarks/cache_wall_scale.py --preset shapes-tiny --sizes 128 --device cpu --precision fp32

Per (size, policy): block-MACs ratio (the run's own count), wall median / min / max over
`--repeats` (policies interleaved within each repeat, after one warm-up of each), and the
wall ratio to no cache measured in the same repeats. Random-weight outputs are meaningless:
only static and token-wise policies are timed (TeaCache / first-block decide from the data).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pixforge.accel.cache import parse_cache_spec
from pixforge.models.presets import get_preset
from pixforge.models.transformer import PixArtTransformer
from pixforge.sampling import samplers as S
from pixforge.sampling.pipeline import guided_model_fn, micro_conditions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
POLICIES = ("none;fora:2;fora:3;fora:3+icc:16;cfg-cache:2;fora:2+cfg-cache:3;delta-dit:interval=2,boundary=0.5;"
            "toca:interval=3,ratio=0.3")


def build(preset: str, device: str, dtype: torch.dtype) -> PixArtTransformer:
    torch.manual_seed(0)
    model = PixArtTransformer(get_preset(preset)).eval()
    return model.to(device=device, dtype=dtype)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def generate(model, size: int, spec: str, steps: int, text_tokens: int, guidance: float, device: str):
    """One cached generation's latents; -> (seconds, block-MACs ratio)."""
    config = model.config
    dtype = next(model.parameters()).dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randn(2, text_tokens, config.caption_channels, generator=g).to(device, dtype)
    mask = torch.ones(2, text_tokens, dtype=torch.long, device=device)
    noise = torch.randn(1, config.in_channels, size // 8, size // 8, generator=g).to(device)
    sync(device)
    start = time.perf_counter()
    policy = parse_cache_spec(None if spec == "none" else spec)
    run = None if policy is None else policy.start(steps, config.num_layers)
    context = model.prepare_text(text, mask)
    resolution = aspect_ratio = None
    if config.uses_micro_conditions:
        resolution, aspect_ratio = micro_conditions(size, size, 2, device)
    plan = S.plan_sampling(S.resolve_sampler("dpm++"), steps, S.ScheduleConfig())
    model_fn = guided_model_fn(model, context, guidance, config.in_channels, resolution, aspect_ratio, run,
                               timesteps=plan.timesteps)
    with torch.inference_mode():
        latents = S.denoise(plan, model_fn, noise)
    sync(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(latents).all():
        raise SystemExit(f"{spec}: non-finite latents")
    ratio = 1.0 if run is None else run.macs_full / max(1, run.macs_spent)
    return seconds, ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pixart-alpha-1024-ms")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--policies", default=POLICIES, help="';'-separated cache specs ('none' = no cache)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text-tokens", type=int, default=120)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="fp32 / bf16 / fp16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    model = build(args.preset, args.device, DTYPES[precision])
    policies = [p.strip() for p in args.policies.split(";") if p.strip()]
    if "none" not in policies:
        policies.insert(0, "none")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M), {precision}, {name}, "
          f"torch {torch.__version__}, {args.steps} dpm++ steps, CFG batch 2, {args.repeats} repeats")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        times = {p: [] for p in policies}
        macs = {}
        for p in policies:  # warm-up (kernels, autotuning, SVDs of icc)
            generate(model, size, p, args.steps, args.text_tokens, args.guidance, args.device)
        for _ in range(args.repeats):
            for p in policies:
                seconds, macs[p] = generate(model, size, p, args.steps, args.text_tokens, args.guidance, args.device)
                times[p].append(seconds)
        base = statistics.median(times["none"])
        for p in policies:
            med = statistics.median(times[p])
            row = {"size": size, "policy": p, "macs_ratio": round(macs[p], 3), "wall_s": round(med, 4),
                   "wall_min": round(min(times[p]), 4), "wall_max": round(max(times[p]), 4),
                   "wall_ratio": round(base / med, 3), "times": [round(t, 4) for t in times[p]]}
            rows.append(row)
            print(f"{size:>5} {p:<34} MACs {row['macs_ratio']:5.2f}x  wall {med * 1000:8.1f} ms "
                  f"({row['wall_min'] * 1000:.1f}-{row['wall_max'] * 1000:.1f})  {row['wall_ratio']:5.2f}x", flush=True)
    if args.out:
        meta = {"preset": args.preset, "precision": precision, "device": name, "torch": torch.__version__,
                "steps": args.steps, "repeats": args.repeats, "text_tokens": args.text_tokens}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
