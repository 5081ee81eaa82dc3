"""Experiment (not a product feature): affine-calibrated reuse for the shipped `ecad` schedule.

Per reused (step, block, component) and per channel, the reused pre-gate output becomes
a * cached + b, fitted by (shrunk) least squares on the cached trajectory itself: while calibrating,
the true output is computed from the current input at every reused position. Scored paired with
plain reuse on validation prompts. It patches `CacheRun._block` for the run, nothing else.

    python benchmarks/cache_affine.py --fit 200 --prompts 400 --shrink 0.1

docs/acceleration.md, "Tried and not shipped: affine-calibrated reuse".
"""
import argparse
import json
import math
import time

import numpy as np
import torch
from pixforge.accel import cache as C
from pixforge.sampling.pipeline import load_pipeline
from pixforge.eval.bench import shapes_items
from pixforge.eval.shapes import CheckPool

MODE = {"mode": "plain"}
STATS, COEF = {}, {}
ERR = {"plain": 0.0, "fit": 0.0, "norm": 0.0}
orig_block = C.CacheRun._block

def true_output(block, comp, x, shift_msa, scale_msa, shift_mlp, scale_mlp, grid, k, v, bias):
    if comp == "attn1":
        return block.self_attention(x, shift_msa, scale_msa, grid)
    if comp == "attn2":
        return block.cross_attention(x, k, v, bias)
    return block.feed_forward(x, shift_mlp, scale_mlp)

def patched(self, index, block, x, t_mod, grid, k, v, bias, compute, text_context, keep_delta):
    mode = MODE["mode"]
    if mode == "plain":
        return orig_block(self, index, block, x, t_mod, grid, k, v, bias, compute, text_context, keep_delta)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(t_mod)
    x_in = x
    for i, comp in enumerate(("attn1", "attn2", "ff")):
        if compute[i]:
            out = self._put(self.outputs, (index, comp), true_output(block, comp, x, shift_msa, scale_msa, shift_mlp, scale_mlp, grid, k, v, bias))
        else:
            cached = self._cached(index, comp)
            key = (self.step, index, comp)
            if mode == "probe":
                t = true_output(block, comp, x, shift_msa, scale_msa, shift_mlp, scale_mlp, grid, k, v, bias)
                c2, t2 = cached.reshape(-1, cached.shape[-1]).double(), t.reshape(-1, t.shape[-1]).double()
                s = STATS.setdefault(key, [0, 0, 0, 0, 0, 0])
                s[0] += c2.shape[0]; s[1] = s[1] + c2.sum(0); s[2] = s[2] + t2.sum(0)
                s[3] = s[3] + (c2 * c2).sum(0); s[4] = s[4] + (c2 * t2).sum(0); s[5] = s[5] + (t2 * t2).sum(0)
                out = cached
            elif mode == "apply":
                a, b = COEF[key]
                out = cached * a + b
            elif mode == "measure":
                t = true_output(block, comp, x, shift_msa, scale_msa, shift_mlp, scale_mlp, grid, k, v, bias)
                a, b = COEF[key]
                ERR["plain"] += float(((cached - t) ** 2).sum()); ERR["fit"] += float(((cached * a + b - t) ** 2).sum())
                ERR["norm"] += float((t ** 2).sum())
                out = cached
        if comp == "attn1":
            x = torch.addcmul(x, gate_msa, out)
        elif comp == "attn2":
            x = x + out
        else:
            x = torch.addcmul(x, gate_mlp, out)
    if keep_delta:
        self._put(self.deltas, index, x - x_in)
    return x

C.CacheRun._block = patched

def fit(shrink):
    COEF.clear()
    for key, (n, sc, st, scc, sct, stt) in STATS.items():
        mc, mt = sc / n, st / n
        var = scc / n - mc * mc
        cov = sct / n - mc * mt
        a = (cov + shrink * var) / (var * (1 + shrink) + 1e-12)
        b = mt - a * mc
        COEF[key] = (a.float(), b.float())

def run(pipe, captions, first_seed, chunk=25):
    images = []
    for s in range(0, len(captions), chunk):
        images.extend(pipe(captions[s:s + chunk], seed=first_seed + s, progress=False, cache="ecad").images)
    return images

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", type=int, default=200, help="calibration prompts (validation 20000...)")
    parser.add_argument("--prompts", type=int, default=400, help="scored prompts (validation from --first-prompt)")
    parser.add_argument("--first-prompt", type=int, default=3000)
    parser.add_argument("--shrink", type=float, default=0.1, help="ridge pull of each slope towards 1")
    parser.add_argument("--out", default="benchmarks/results/cache_affine.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = load_pipeline()
    t0 = time.time()
    fit_items = shapes_items(20000 + args.fit, "validation")[20000:]
    MODE["mode"] = "probe"
    run(pipe, [it.caption for it in fit_items], 20000)
    fit(args.shrink)
    print(f"fitted {len(COEF)} reused (step, block, component) on {args.fit} prompts in {time.time()-t0:.0f}s", flush=True)
    hold = shapes_items(21000 + 50, "validation")[21000:]
    MODE["mode"] = "measure"
    run(pipe, [it.caption for it in hold], 21000)
    plain_err, fit_err = math.sqrt(ERR["plain"] / ERR["norm"]), math.sqrt(ERR["fit"] / ERR["norm"])
    print(f"held-out reuse error (relative L2, 50 prompts): plain {plain_err:.4f} fitted {fit_err:.4f}", flush=True)
    items = shapes_items(args.first_prompt + args.prompts, "validation")[args.first_prompt:]
    caps = [it.caption for it in items]
    checker = CheckPool(0)
    res = {}
    for mode in ("plain", "apply"):
        MODE["mode"] = mode
        t = time.time()
        res[mode] = [int(v) for v in checker.submit(run(pipe, caps, 0), caps)()]
        print(mode, f"{100*np.mean(res[mode]):.1f}%", f"{time.time()-t:.0f}s", flush=True)
    d = np.array(res["apply"]) - np.array(res["plain"])
    summary = f"{100*d.mean():+.1f} ± {100*d.std(ddof=1)/math.sqrt(len(d)):.1f} (lost {int((d<0).sum())}, gained {int((d>0).sum())})"
    print("paired affine - plain:", summary)
    json.dump({"schedule": "ecad", "fit_prompts": args.fit, "shrink": args.shrink, "split": "validation",
               "first_prompt": args.first_prompt, "reuse_error": {"plain": plain_err, "fitted": fit_err},
               "paired": summary, "passed": res}, open(args.out, "w"))


if __name__ == "__main__":
    main()
