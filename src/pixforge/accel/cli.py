"""`pixforge search-cache`: ECAD's NSGA-II search for cache schedules on a model."""
from __future__ import annotations

import typer


DEVICE_HELP = "cpu | cuda | cuda:N | auto (a GPU where one is visible): where the candidates' images are generated."


def _pipeline_and_cost(model, precision: str, cfg, device: str = "cpu"):
    """The pipeline, its guidance scale, and a schedule's MACs relative to no cache on it."""
    from pixforge.accel.cache import schedule_macs
    from pixforge.sampling.pipeline import load_pipeline

    pipe = load_pipeline(model, precision=precision, device=device)
    guidance = pipe.guidance_scale if cfg is None else cfg
    batch = 2 if guidance > 1 else 1

    def macs_ratio(schedule) -> float:
        size = pipe.native_size
        m = schedule_macs(pipe.transformer, schedule, size, size, pipe.max_sequence_length, batch=batch,
                          vae_scale_factor=pipe.vae_scale_factor)
        return 1.0 / m["ratio"]

    return pipe, guidance, macs_ratio


def _dtype_name(pipe) -> str:
    """The transformer's dtype as a search identity records it ("float32", "bfloat16")."""
    return str(pipe.transformer.dtype).removeprefix("torch.")


def search_cache_command(
    model: str = typer.Option(None, "--model", help="Model folder (default: the embedded model)."),
    out: str = typer.Option("runs/ecad", "--out", help="Search folder: state (resumable), pareto.json, front/, plot."),
    generations: int = typer.Option(20, "--generations", help="Total generations (re-run with more to continue)."),
    time_budget: float = typer.Option(
        0.0, "--time-budget-minutes",
        help="Start no new generation after this many minutes (0: no limit); the front is written after every "
             "generation either way, so a cut-off run leaves a usable one."),
    population: int = typer.Option(72, "--population", help="NSGA-II population (ECAD: 72)."),
    prompts: int = typer.Option(32, "--prompts", help="Calibration prompts (shapes-world validation split)."),
    first_prompt: int = typer.Option(
        0, "--first-prompt",
        help="Index of the first calibration prompt (and its seed): calibrate on prompts no earlier search "
             "selected its seeds on."),
    steps: int = typer.Option(20, "--steps", help="Sampling steps the schedules are for."),
    cfg: float = typer.Option(None, "--cfg", help="Guidance scale (default: the model's)."),
    mutation: float = typer.Option(0.05, "--mutation", help="Bit-flip rate per bit."),
    random_fraction: float = typer.Option(
        0.5, "--random-fraction",
        help="Share of the first population drawn at random; the rest are hand-made seeds (late-dense, FORA, Δ-DiT)."),
    seed: int = typer.Option(0, "--seed", help="Search seed (the prompts' seeds are fixed)."),
    granularity: str = typer.Option(
        "component", "--granularity",
        help="What one genome bit decides: component (ECAD: step x block x component) | step-component "
             "(a component type in all blocks at a step) | step (a whole step). Coarser for small budgets."),
    cfg_cache: bool = typer.Option(
        False, "--cfg-cache",
        help="Also search, per step, whether to run the unconditional CFG branch or reuse its delta (CFG-cache)."),
    seed_from: list[str] = typer.Option(
        None, "--seed-from",
        help="An earlier search's pareto.json, or a schedule file: its schedules lead the first population "
             "(repeatable; with --cfg-cache each also with CFG-cache every 2nd and 3rd step)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 | auto."),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    quality_kind: str = typer.Option(
        "accuracy", "--quality",
        help="accuracy: the shapes checker's pass rate | agreement: PSNR to the uncached images "
             "(lower variance on few prompts; the front's quality axis is then PSNR/40)."),
    min_speedup: float = typer.Option(
        1.0, "--min-speedup",
        help="Search only schedules at least this much cheaper in MACs (candidates outside the window are "
             "never run; the whole population works where you need a schedule)."),
    max_speedup: float = typer.Option(float("inf"), "--max-speedup", help="... and at most this much cheaper."),
    icc: int = typer.Option(
        0, "--icc",
        help="Search schedules whose reused components are increment-calibrated at this rank (icc; 0: plain "
             "reuse). MACs count the calibration."),
) -> None:
    """Search per-step x per-block x per-component cache schedules (ECAD, NSGA-II via pymoo).

    Objectives: shapes-checker accuracy on calibration prompts, and MACs relative to no cache.
    Writes OUT/pareto.json (every point a usable schedule, also as OUT/front/*.json for
    `--cache`) and OUT/pareto.png with FORA and Δ-DiT overlaid. Interrupted? Re-run it.

      pixforge search-cache --out runs/ecad --generations 10 --population 24 --prompts 32

      pixforge generate "two red circles" --cache runs/ecad/front/03-q0.938-x2.61.json
    """

    import time

    from pixforge.accel.cache import DeltaDiT, Fora
    from pixforge.accel.ecad import (AGREEMENT_CAP_DB, ScheduleSearch, SearchConfig, agreement_quality, front_schedules,
                                      plot_front, shapes_quality)
    from pixforge.errors import PixforgeError

    if quality_kind not in ("accuracy", "agreement"):
        raise PixforgeError(f"--quality {quality_kind!r}: choose accuracy or agreement")
    if time_budget < 0:
        raise PixforgeError(f"--time-budget-minutes {time_budget} must be >= 0")
    if prompts < 1 or first_prompt < 0:
        raise PixforgeError(f"--prompts {prompts} must be >= 1 and --first-prompt {first_prompt} >= 0")
    seeds = [schedule for path in seed_from or [] for schedule in front_schedules(path)]

    pipe, guidance, macs_ratio = _pipeline_and_cost(model, precision, cfg, device)
    blocks = pipe.transformer.config.num_layers
    make_quality = shapes_quality if quality_kind == "accuracy" else agreement_quality
    quality = make_quality(pipe, n_prompts=prompts, steps=steps, cfg=guidance, seed=first_prompt)
    if cfg_cache and guidance <= 1:
        raise PixforgeError(f"--cfg-cache needs classifier-free guidance; the guidance scale is {guidance}")
    window = None if (min_speedup, max_speedup) == (1.0, float("inf")) else (min_speedup, max_speedup)
    config = SearchConfig(population=population, mutation_rate=mutation, seed=seed, random_fraction=random_fraction,
                          granularity=granularity, guidance=cfg_cache, speedup=window, calibration_rank=icc)
    identity = {"model": pipe.model_hash, "prompts": prompts, "cfg": guidance}
    if first_prompt:  # (searches from before the option keep their identity)
        identity["first_prompt"] = first_prompt
    if quality_kind != "accuracy":  # (searches from before the option keep their identity)
        identity["quality"] = quality_kind
    if _dtype_name(pipe) != "float32":  # evaluations depend on it (fp32 searches keep their identity)
        identity["precision"] = _dtype_name(pipe)
    if pipe.device.type != "cpu":  # so do GPU kernels (CPU searches keep their identity)
        identity["device"] = pipe.device.type
    search = ScheduleSearch(quality, macs_ratio, steps, blocks, out, config, identity=identity, seeds=seeds)

    def report(record: dict) -> None:
        if quality_kind == "accuracy":
            best = ", ".join(f"{100 * q:.0f}%@{r:.2f}" for q, r in record["front"][:6])
        else:  # agreement: PSNR to the uncached images, capped at 40 dB, / 40
            best = ", ".join(f"{AGREEMENT_CAP_DB * q:.1f}dB@{r:.2f}" for q, r in record["front"][:6])
        typer.echo(f"gen {record['generation']:3d}: {record['new']:3d} new evaluations "
                   f"({record['seconds']:.0f} s); front ({quality_kind}@MACs): {best}")
        search.write_front(search.front())

    deadline = time.time() + 60 * time_budget if time_budget else None
    front = search.run(generations, progress=report, deadline=deadline)
    path = search.write_front(front)
    baselines = {}
    for name, schedule in [("no cache", None), ("fora:2", Fora(2).schedule(steps, blocks)),
                           ("fora:3", Fora(3).schedule(steps, blocks)),
                           ("delta-dit", DeltaDiT(2, 0.5, blocks // 2).schedule(steps, blocks))]:
        if schedule is None:
            from pixforge.accel.cache import CacheSchedule

            schedule = CacheSchedule.all_compute(steps, blocks)
        baselines[name] = (quality([schedule])[0], macs_ratio(schedule))
    plot = plot_front(front, baselines, search.out_dir / "pareto.png")
    typer.echo(f"wrote {path} ({len(front)} points) and {plot}")


def rescore_cache_command(
    sources: list[str] = typer.Argument(..., help="Searches' folders or pareto.json files, or schedule files."),
    out: str = typer.Option("runs/ecad-rescored", "--out", help="Folder for pareto.json, front/ and the plot."),
    model: str = typer.Option(None, "--model", help="Model folder (default: the embedded model)."),
    prompts: int = typer.Option(256, "--prompts", help="Fresh prompts (shapes-world validation split)."),
    first_prompt: int = typer.Option(
        1000, "--first-prompt",
        help="Index of the first fresh prompt: past every source's calibration prompts (an overlap is refused)."),
    min_speedup: float = typer.Option(1.0, "--min-speedup", help="Skip candidates below this MACs speed-up."),
    max_speedup: float = typer.Option(float("inf"), "--max-speedup", help="Skip candidates above this MACs speed-up."),
    steps: int = typer.Option(20, "--steps", help="Sampling steps the schedules are for."),
    cfg: float = typer.Option(None, "--cfg", help="Guidance scale (default: the model's)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 | auto."),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    top: int = typer.Option(
        0, "--top",
        help="Also re-score each search's N best evaluated schedules inside the speed-up window, by the quality "
             "its search measured, not only its front (the front's points are the most over-rated). Needs the "
             "search folder (its search_state.json; searches saved before this option keep only their final "
             "population's schedules); from an earlier re-scoring, its N best dominated candidates."),
    time_budget: float = typer.Option(
        0.0, "--time-budget-minutes",
        help="Start no new batch of candidates after this many minutes (0: no limit); what is scored by then is "
             "written (candidates go in order: each source's front, then its --top schedules)."),
    calibration_deltas: bool = typer.Option(
        True, "--calibration-deltas/--no-calibration-deltas",
        help="Also run no cache on each search's own calibration prompts, at that search's precision, for the "
             "Δ it measured (one extra evaluation per search; a bf16 search on a CPU without fast bf16 makes it "
             "the slowest step)."),
) -> None:
    """Score searches' Pareto points again on prompts none of them calibrated on; keep the front of that.

    A front picked on one noisy accuracy estimate over-rates its points (the winner's curse);
    the fresh estimate is unbiased. Writes OUT/pareto.json (each point with its fresh quality and
    its Δ against no cache on the same prompts; where known, the quality and Δ its search measured
    on its own calibration prompts) and OUT/front/*.json for `--cache`.

      pixforge rescore-cache runs/ecad-v6 runs/ecad-v8 --prompts 256 --min-speedup 2
    """
    from pathlib import Path

    from pixforge.accel.ecad import (STATE_FILE, evaluated_points, front_points, plot_front, rescore, schedule_key,
                                      scored_points, search_identity, shapes_quality, write_front)
    from pixforge.errors import PixforgeError

    if prompts < 1 or first_prompt < 0 or top < 0 or time_budget < 0:
        raise PixforgeError(f"--prompts {prompts} must be >= 1, --first-prompt {first_prompt}, --top {top} and "
                            f"--time-budget-minutes {time_budget} >= 0")
    import time

    deadline = time.time() + 60 * time_budget if time_budget else None

    def evaluated(source: str, identity: dict | None) -> list:
        """A search folder's evaluated schedules, or a re-scoring's other scored candidates; none for a
        schedule file (no identity)."""
        folder = Path(source) if Path(source).is_dir() else Path(source).parent
        if identity is not None and (folder / STATE_FILE).is_file():
            return evaluated_points(folder)
        others = scored_points(source) if identity is not None else []
        if not others:
            typer.echo(f"{source}: no search state beside it and no other scored points; --top takes nothing "
                       f"more from it", err=True)
        return others

    # (front points, more evaluated points, identity) per source; bad files fail first
    identities = [search_identity(source) for source in sources]
    loaded = [(front_points(source), evaluated(source, identity) if top else [], identity)
              for source, identity in zip(sources, identities)]
    for source, (_, _, identity) in zip(sources, loaded):  # fresh means none of them selected on these prompts
        if identity and "prompts" in identity:
            start = int(identity.get("first_prompt", 0))
            if start < first_prompt + prompts and first_prompt < start + int(identity["prompts"]):
                raise PixforgeError(
                    f"{source} was selected on validation prompts {start}..{start + int(identity['prompts']) - 1}; "
                    f"--first-prompt {first_prompt} --prompts {prompts} overlaps them: choose fresh prompts")
    pipe, guidance, macs_ratio = _pipeline_and_cost(model, precision, cfg, device)
    layers = pipe.transformer.config.num_layers
    baselines = {}  # (prompts, cfg, steps) of a search -> its no-cache accuracy on its calibration prompts

    def search_baseline(identity: dict | None) -> float | None:
        """No cache on the prompts a search calibrated on, when its quality was accuracy."""
        if (not calibration_deltas or not identity or identity.get("quality", "accuracy") != "accuracy"
                or "prompts" not in identity):
            return None
        key = (int(identity["prompts"]), float(identity.get("cfg", guidance)), int(identity.get("steps", steps)),
               identity.get("precision", "float32"), int(identity.get("first_prompt", 0)))
        if key not in baselines:  # at the search's precision
            pipe.set_precision("bf16" if key[3] == "bfloat16" else "fp32")
            baselines[key] = shapes_quality(pipe, n_prompts=key[0], steps=key[2], cfg=key[1], seed=key[4])([None])[0]
            pipe.set_precision(precision)
        return baselines[key]

    searched = {}  # schedule key -> (quality its search measured, that search's no-cache accuracy)
    candidates = {}
    for points, more, identity in loaded:
        for schedule, measured in [*points, *more]:
            if (schedule.steps, schedule.blocks) != (steps, layers):
                raise PixforgeError(f"schedule {schedule.name!r} is for {schedule.steps} steps x {schedule.blocks} "
                                    f"blocks; this model and --steps give {steps} x {layers}")
        in_window = [(s, q) for s, q in [*points, *more] if min_speedup <= 1.0 / macs_ratio(s) <= max_speedup]
        front_keys = {schedule_key(s) for s, _ in points}
        extra = [(s, q) for s, q in in_window if schedule_key(s) not in front_keys][:top]
        for schedule, measured in [p for p in in_window if schedule_key(p[0]) in front_keys] + extra:
            candidates.setdefault(schedule_key(schedule), schedule)
            if measured is not None:
                searched.setdefault(schedule_key(schedule), (measured, search_baseline(identity)))
    candidates = list(candidates.values())
    if not candidates:
        raise PixforgeError(f"no candidate schedule between --min-speedup {min_speedup} and --max-speedup {max_speedup}")
    quality = shapes_quality(pipe, n_prompts=prompts, steps=steps, cfg=guidance, seed=first_prompt)
    baseline = quality([None])[0]
    typer.echo(f"{len(candidates)} candidates from {len(sources)} sources; validation prompts "
               f"{first_prompt}..{first_prompt + prompts - 1}, no cache {100 * baseline:.1f}%")
    scored, front = rescore(candidates, quality, macs_ratio,
                            progress=lambda done, total: typer.echo(f"  {done}/{total}", err=True), deadline=deadline)
    if not scored:
        raise PixforgeError(f"--time-budget-minutes {time_budget} was spent before the first candidate was scored")
    if len(scored) < len(candidates):
        typer.echo(f"time budget spent: {len(scored)} of {len(candidates)} candidates scored", err=True)
    for point in scored:
        measured, search_no_cache = searched.get(schedule_key(point["schedule"]), (None, None))
        point["delta"] = point["quality"] - baseline
        point["calibration_quality"] = measured
        point["calibration_delta"] = None if search_no_cache is None else measured - search_no_cache
    identity = {"model": pipe.model_hash, "prompts": prompts, "first_prompt": first_prompt, "cfg": guidance,
                "steps": steps, "precision": _dtype_name(pipe), "device": pipe.device.type,
                "no_cache_quality": baseline, "rescored_from": [str(source) for source in sources]}
    path = write_front(out, identity, front, others=[p for p in scored if not any(p is f for f in front)])
    plot = plot_front(front, {"no cache": (baseline, 1.0)}, f"{out}/pareto.png")
    for point in scored:
        mark = "*" if any(point is p for p in front) else " "
        was = point["calibration_delta"]
        typer.echo(f"{mark} x{point['speedup_macs']:.2f}  {100 * point['quality']:5.1f}%  Δ {100 * point['delta']:+5.1f}"
                   + ("" if was is None else f"  (its search: Δ {100 * was:+5.1f})"))
    typer.echo(f"wrote {path} ({len(front)} points, * above) and {plot}")
