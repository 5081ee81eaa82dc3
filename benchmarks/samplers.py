"""Sampler overhead: our sampling loop vs the diffusers scheduler loop, with a trivial model.

    python benchmarks/samplers.py [--repeats 9] [--threads 2]

The model is `eps = 0.1 * x` (one tiny op), so the time is the sampler's own per-step
cost: coefficient math, tensor updates, Python. Each repeat runs a whole loop
(20 steps, 4 for lcm) on a (2, 4, 16, 16) latent (128², CFG batch) and on (2, 4, 128, 128)
(1024²); the table shows µs per step, median of N with (min–max), and diffusers / ours
(ratio of medians and of minima; the two loops alternate, run by run).
"set-up" is building the schedule for a new step count: our `plan_sampling` (cache
cleared) vs the diffusers scheduler's constructor + `set_timesteps`.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from pixforge.eval.bench import median_range, timed_pair

from pixforge.sampling import samplers as S

BETAS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
CASES = {"dpm++": 20, "ddim": 20, "euler": 20, "euler-a": 20, "lcm": 4}


def diffusers_scheduler(name: str):
    import diffusers

    if name == "dpm++":
        return diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=2)
    if name == "ddim":
        return diffusers.DDIMScheduler(**BETAS, timestep_spacing="linspace", clip_sample=False)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**BETAS, timestep_spacing="linspace")
    if name == "euler-a":
        return diffusers.EulerAncestralDiscreteScheduler(**BETAS, timestep_spacing="linspace")
    return diffusers.LCMScheduler(**BETAS)


def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.1 * x


def diffusers_loop(scheduler, steps: int, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, generator=generator, return_dict=False)[0]
    return x


def fmt(values: list[float]) -> str:
    return median_range(values, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"median of {args.repeats} (min–max)\n")
    print("| sampler | latent | diffusers µs/step | ours µs/step | diffusers / ours (median) | (min) |")
    print("|---|---|---|---|---|---|")
    for shape in ((2, 4, 16, 16), (2, 4, 128, 128)):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        for name, steps in CASES.items():
            scheduler = diffusers_scheduler(name)
            plan = S.plan_sampling(name, steps)
            theirs, ours = timed_pair(
                lambda: diffusers_loop(scheduler, steps, noise, torch.Generator().manual_seed(1)),
                lambda: S.denoise(plan, model, noise, torch.Generator().manual_seed(1)),
                args.repeats,
            )
            theirs_us = [t / steps * 1e6 for t in theirs]
            ours_us = [t / steps * 1e6 for t in ours]
            ratio = statistics.median(theirs_us) / statistics.median(ours_us)
            ratio_min = min(theirs_us) / min(ours_us)
            print(f"| {name} ({steps} steps) | {tuple(shape)} | {fmt(theirs_us)} | {fmt(ours_us)} | "
                  f"{ratio:.2f}x | {ratio_min:.2f}x |")

    print("\n| sampler | diffusers set-up ms | ours set-up ms (uncached) | diffusers / ours (median) | (min) |")
    print("|---|---|---|---|---|")
    for name, steps in CASES.items():
        def ours_setup():
            S._plan_cached.cache_clear()
            S.plan_sampling(name, steps)

        theirs, ours = timed_pair(lambda: diffusers_scheduler(name).set_timesteps(steps), ours_setup, args.repeats)
        theirs, ours = [t * 1e3 for t in theirs], [t * 1e3 for t in ours]
        ratio = statistics.median(theirs) / statistics.median(ours)
        print(f"| {name} | {fmt(theirs)} | {fmt(ours)} | {ratio:.2f}x | {min(theirs) / min(ours):.2f}x |")


if __name__ == "__main__":
    main()
