"""Which quality signal should ECAD's search optimise? Scores a few cache schedules on two
disjoint validation prompt sets with both signals `pixforge search-cache` offers: pass/fail
accuracy of the shapes checker (`--quality accuracy`) and agreement with the uncached images
(`--quality agreement`, PSNR/40). A useful signal ranks the schedules the same way on both sets
and the same way as the held-aside test accuracy in docs/acceleration.md.

    python benchmarks/cache_quality_signal.py --prompts 50
"""
from __future__ import annotations

import argparse
import json

import torch

from pixforge.accel.cache import CacheSchedule, parse_cache_spec
from pixforge.accel.ecad import agreement_quality, shapes_quality
from pixforge.sampling.pipeline import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--policies", default="fora:2;fora:3;teacache:0.2")
    parser.add_argument("--ecad", default="benchmarks/results/ecad_v3_pareto.json")
    parser.add_argument("--ecad-points", default="8,4", help="front indices to include")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = load_pipeline()
    schedules = {spec: parse_cache_spec(spec, pipe.teacache_coefficients) for spec in args.policies.split(";")}
    front = json.load(open(args.ecad))["front"]
    for i in (int(k) for k in args.ecad_points.split(",")):
        schedules[f"ecad x{front[i]['speedup_macs']:.2f}"] = CacheSchedule.from_dict(front[i]["schedule"])
    rows = {name: {} for name in ["no cache", *schedules]}
    for label, seed in (("A", 0), ("B", 10_000)):
        accuracy = shapes_quality(pipe, n_prompts=args.prompts, seed=seed)
        agreement = agreement_quality(pipe, n_prompts=args.prompts, seed=seed)
        rows["no cache"][f"accuracy {label}"] = accuracy([None])[0]
        for name, schedule in schedules.items():
            rows[name][f"accuracy {label}"] = accuracy([schedule])[0]
            rows[name][f"agreement {label}"] = agreement([schedule])[0]
    for name, row in rows.items():
        print(f"{name:<14} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    if args.out:
        json.dump(rows, open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
