"""Feature caching on a model: MACs ratio, wall ratio and compositional accuracy per policy.

    python benchmarks/cache.py                                   # the embedded default model
    python benchmarks/cache.py --model DIR --prompts 300 --repeats 3 --ecad runs/ecad/pareto.json

Policies: no cache, FORA 2/3, Δ-DiT, ToCa, TeaCache at several thresholds, first-block,
late-dense, CFG-cache alone and with other policies, up to 3 ECAD Pareto points per
front (--ecad), and no cache at fewer solver steps (--fewer-steps: the same saving without
a cache). `SPEC@N` runs a policy with N solver steps (`fora:4@30`: more, finer steps, each
reused more): its MACs ratio is still against no cache at --steps. MACs come from the run's own accounting (exact,
checked against torch's FLOP counter in tests) plus the per-step and text overheads;
wall time is the median of --repeats interleaved runs of one generation (1 image, the
same seed, every policy in turn, so machine noise hits all alike); accuracy is the shapes
checker on --prompts test-split prompts (held aside from the validation split that ECAD's
search calibrates on), with each policy's change against no cache on the same prompts and
seeds and its paired standard error (the per-prompt pass/fail strings are in the JSON).
--baseline-from takes the no-cache verdicts from an earlier output on the same prompts
(no cache is still timed in this run; only its 20-step accuracy pass is skipped, ~8 minutes
at 600 prompts on 2 cores). Prints a table; writes JSON and a plot.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pixforge.accel import cache as C
from pixforge.accel.cache import CacheSchedule, batch_shares, parse_cache_spec, step_overhead_macs, text_macs
from pixforge.eval.bench import checker_passes, interleaved, median_range, shapes_items, stored_no_cache_verdicts
from pixforge.eval.shapes import CheckPool, default_check_workers
from pixforge.sampling.pipeline import load_pipeline

HAND_MADE = ["fora:2", "fora:3", "delta-dit:interval=2,boundary=0.5", "toca:interval=3,ratio=0.3",
             "teacache:0.05", "teacache:0.1", "teacache:0.2", "first-block:0.1", "late-dense:0.5", "late-dense:0.4"]


def generation_macs(pipe, result, batch: int) -> tuple[float, float]:
    """(spent, no-cache) MACs of one generation: blocks as run + per-step and text overheads."""
    run = result.cache
    size = result.latents.shape[-2:]
    tokens = (size[0] // pipe.transformer.config.patch_size) * (size[1] // pipe.transformer.config.patch_size)
    overhead = step_overhead_macs(pipe.transformer, batch, tokens)
    text = text_macs(pipe.transformer, batch, pipe.max_sequence_length)
    # CFG-cache steps run the conditional half of the batch only
    steps_run = run.steps if run.guidance is None or batch == 1 else float(batch_shares(run.guidance).sum())
    return run.macs_spent + overhead * steps_run + text, run.macs_full + overhead * run.steps + text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ecad", action="append", default=[],
                        help="pareto.json of `pixforge search-cache` (repeatable); 3 points of each are benchmarked")
    parser.add_argument("--ecad-speedups", default=None,
                        help="e.g. 1.5,2,2.5: benchmark the best-quality front point at or above each MACs speed-up "
                             "(as printed, 2 decimals) "
                             "(default: the front's first, middle and last point)")
    parser.add_argument("--policies", default=";".join(["none", *HAND_MADE]), help="';'-separated cache specs")
    parser.add_argument("--batch", type=int, default=25, help="images per accuracy generation call")
    parser.add_argument("--fewer-steps", default="",
                        help="e.g. 10,8: also no cache at these step counts (the baseline every cache must beat: "
                             "the same MACs saved by sampling with fewer solver steps)")
    parser.add_argument("--split", default="test", choices=["test", "validation"],
                        help="test (the report) or validation (for choosing among variants without touching test)")
    parser.add_argument("--first-prompt", type=int, default=0)
    parser.add_argument("--baseline-from", default=None,
                        help="an earlier output of this script with a 'none' row on the same --prompts and --steps: "
                             "reuse its no-cache verdicts instead of scoring no cache again")
    parser.add_argument("--cfg", type=float, default=None,
                        help="guidance scale for every policy (default: the model's). With --baseline-from, the "
                             "stored no-cache verdicts keep the scale they were scored at: a cache compared, at "
                             "another scale, with no cache at the model's")
    parser.add_argument("--device", default="cpu",
                        help="where to generate (cpu | cuda | auto); on a GPU the checker runs in worker processes "
                             "and the wall column times that GPU")
    parser.add_argument("--out", default="benchmarks/results/cache.json")
    parser.add_argument("--plot", default="docs/img/cache.png")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    stored_none = (stored_no_cache_verdicts(args.baseline_from, args.prompts, args.steps, args.split, args.first_prompt)
                   if args.baseline_from else None)
    pipe = load_pipeline(args.model, device=args.device)
    checker = CheckPool(default_check_workers(pipe.device.type))
    model_cfg = pipe.guidance_scale
    if args.cfg is not None:
        if not args.cfg >= 0:
            raise SystemExit(f"--cfg {args.cfg} must be >= 0")
        pipe.guidance_scale = args.cfg
    blocks = pipe.transformer.config.num_layers
    policies: dict[str, object] = {}
    steps_of = {}
    for spec in args.policies.split(";"):
        policy_spec, at, n = spec.rpartition("@") if "@" in spec else (spec, "", "")
        if at and not n.isdigit():
            raise SystemExit(f"policy {spec!r}: SPEC@N takes a step count N")
        policies[spec] = parse_cache_spec(policy_spec, pipe.teacache_coefficients, pipe.cache_schedules)
        steps_of[spec] = int(n) if at else args.steps
    for pareto in args.ecad:
        front = json.loads(Path(pareto).read_text())["front"]
        if args.ecad_speedups:  # the best-quality point at or above each MACs speed-up
            picks = []
            for floor in (float(x) for x in args.ecad_speedups.split(",")):
                above = [i for i, p in enumerate(front) if round(p["speedup_macs"], 2) >= floor]  # as printed
                if above:
                    picks.append(max(above, key=lambda i: (front[i]["quality"], -front[i]["macs_ratio"])))
            picks = sorted(set(picks))
        else:
            picks = sorted({0, len(front) // 2, len(front) - 1}) if len(front) > 3 else range(len(front))
        label = f"ecad {Path(pareto).parent.name}" if len(args.ecad) > 1 else "ecad"
        for i in picks:
            point = front[i]
            policies[f"{label} x{point['speedup_macs']:.2f}"] = CacheSchedule.from_dict(point["schedule"])

    steps_of = {name: steps_of.get(name, args.steps) for name in policies}
    for n in (int(x) for x in args.fewer_steps.split(",") if x.strip()):
        policies[f"no cache, {n} steps"], steps_of[f"no cache, {n} steps"] = None, n
    guided = pipe.guidance_scale > 1
    batch = 2 if guided else 1
    items = shapes_items(args.first_prompt + args.prompts, args.split)[args.first_prompt:]

    def one(policy, steps):
        return lambda: pipe(items[0].caption, num_inference_steps=steps, seed=0, progress=False, cache=policy)

    print(f"model {args.model or 'embedded default'} on {pipe.device}; {args.steps} steps; CFG {pipe.guidance_scale}"
          + (f" (stored no-cache verdicts: {args.baseline_from})" if stored_none is not None else "")
          + f"; wall: median of {args.repeats}")
    walls = interleaved({name: one(policy, steps_of[name]) for name, policy in policies.items()}, args.repeats)
    rows, per_prompt = [], {}
    base_wall = float(np.median(walls["none"]))
    # MACs of no cache at --steps: every row's ratio is against it (fewer-steps rows included)
    _, base_full = generation_macs(pipe, one(C.Fora(1), args.steps)(), batch)
    for name, policy in policies.items():
        steps = steps_of[name]
        result = one(policy if policy is not None else C.Fora(1), steps)()  # fora:1 = no cache, with MAC accounting
        spent, _ = generation_macs(pipe, result, batch)
        start = time.time()
        if name == "none" and stored_none is not None:
            passes = stored_none
        else:  # the MACs these runs spent: what an adaptive policy decides depends on the batch
            eval_macs = [0.0, 0.0]  # spent, no cache at --steps

            def tally(out, policy=policy, spent=spent):
                images = len(out.images)
                eval_macs[0] += spent * images if policy is None else generation_macs(pipe, out, batch * images)[0]
                eval_macs[1] += base_full * images
            passes = checker_passes(pipe, items, steps, policy, args.batch, on_result=tally, checker=checker)
        per_prompt[name] = np.array(passes)
        rows.append({
            "policy": name, "steps": steps, "macs_ratio": base_full / spent,
            "wall_ratio": base_wall / float(np.median(walls[name])),
            "wall_s": median_range(walls[name]), "accuracy": float(np.mean(passes)), "n": len(items),
            "eval_seconds": round(time.time() - start, 1), "passed": "".join(map(str, passes)),
        })
        if name != "none" or stored_none is None:  # MACs ratio over the accuracy runs themselves
            rows[-1]["macs_ratio_accuracy_runs"] = eval_macs[1] / eval_macs[0]
        r = rows[-1]
        if "none" in per_prompt:  # paired with no cache on the same prompts and seeds
            d = per_prompt[name] - per_prompt["none"]
            r["delta"], r["delta_se"] = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
        delta = f"  Δ {100 * r['delta']:+5.1f} ± {100 * r['delta_se']:.1f}" if "delta" in r else ""
        if abs(r.get("macs_ratio_accuracy_runs", r["macs_ratio"]) / r["macs_ratio"] - 1) > 0.005:  # adaptive
            delta += f"  (MACs x{r['macs_ratio_accuracy_runs']:.2f} over the accuracy runs)"
        print(f"{name:<38} MACs x{r['macs_ratio']:5.2f}  wall x{r['wall_ratio']:5.2f} ({r['wall_s']} s)  "
              f"accuracy {100 * r['accuracy']:5.1f}%{delta}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "split": args.split, "first_prompt": args.first_prompt,
                                          "repeats": args.repeats, "blocks": blocks,
                                          "device": pipe.device.type, "cfg": pipe.guidance_scale,
                                          "no_cache_cfg": pipe.guidance_scale if stored_none is None else
                                          json.loads(Path(args.baseline_from).read_text()).get("cfg", model_cfg),
                                          "rows": rows}, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            marker = "o" if r["policy"].startswith("ecad") else "s"
            ax.scatter([1 / r["macs_ratio"]], [100 * r["accuracy"]], marker=marker)
            ax.annotate(r["policy"].split(",")[0], (1 / r["macs_ratio"], 100 * r["accuracy"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("MACs relative to no cache")
        ax.set_ylabel(f"compositional accuracy, % of {args.prompts}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
