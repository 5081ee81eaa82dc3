"""`pixforge search-cache`: ECAD's NSGA-II search for cache schedules on a model."""
from __future__ import annotations

import typer


def search_cache_command(
    model: str = typer.Option(None, "--model", help="Model folder (default: the embedded model)."),
    out: str = typer.Option("runs/ecad", "--out", help="Search folder: state (resumable), pareto.json, front/, plot."),
    generations: int = typer.Option(20, "--generations", help="Total generations (re-run with more to continue)."),
    population: int = typer.Option(72, "--population", help="NSGA-II population (ECAD: 72)."),
    prompts: int = typer.Option(32, "--prompts", help="Calibration prompts (shapes-world validation split)."),
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
    quality_kind: str = typer.Option(
        "accuracy", "--quality",
        help="accuracy: the shapes checker's pass rate | agreement: PSNR to the uncached images "
             "(lower variance on few prompts; the front's quality axis is then PSNR/40)."),
) -> None:
    """Search per-step x per-block x per-component cache schedules (ECAD, NSGA-II via pymoo).

    Objectives: shapes-checker accuracy on calibration prompts, and MACs relative to no cache.
    Writes OUT/pareto.json (every point a usable schedule, also as OUT/front/*.json for
    `--cache`) and OUT/pareto.png with FORA and Δ-DiT overlaid. Interrupted? Re-run it.

      pixforge search-cache --out runs/ecad --generations 10 --population 24 --prompts 32

      pixforge generate "two red circles" --cache runs/ecad/front/03-q0.938-x2.61.json
    """

    from pixforge.accel.cache import DeltaDiT, Fora, schedule_macs
    from pixforge.accel.ecad import (AGREEMENT_CAP_DB, ScheduleSearch, SearchConfig, agreement_quality, front_schedules,
                                      plot_front, shapes_quality)
    from pixforge.errors import PixforgeError
    from pixforge.sampling.pipeline import load_pipeline

    if quality_kind not in ("accuracy", "agreement"):
        raise PixforgeError(f"--quality {quality_kind!r}: choose accuracy or agreement")
    seeds = [schedule for path in seed_from or [] for schedule in front_schedules(path)]

    pipe = load_pipeline(model, precision=precision)
    blocks = pipe.transformer.config.num_layers
    size = pipe.native_size
    text_len = pipe.max_sequence_length
    guidance = pipe.guidance_scale if cfg is None else cfg
    batch = 2 if guidance > 1 else 1

    def macs_ratio(schedule) -> float:
        m = schedule_macs(pipe.transformer, schedule, size, size, text_len, batch=batch,
                          vae_scale_factor=pipe.vae_scale_factor)
        return 1.0 / m["ratio"]

    make_quality = shapes_quality if quality_kind == "accuracy" else agreement_quality
    quality = make_quality(pipe, n_prompts=prompts, steps=steps, cfg=guidance)
    if cfg_cache and batch == 1:
        raise PixforgeError(f"--cfg-cache needs classifier-free guidance; the guidance scale is {guidance}")
    config = SearchConfig(population=population, mutation_rate=mutation, seed=seed, random_fraction=random_fraction,
                          granularity=granularity, guidance=cfg_cache)
    identity = {"model": pipe.model_hash, "prompts": prompts, "cfg": guidance}
    if quality_kind != "accuracy":  # (searches from before the option keep their identity)
        identity["quality"] = quality_kind
    search = ScheduleSearch(quality, macs_ratio, steps, blocks, out, config, identity=identity, seeds=seeds)

    def report(record: dict) -> None:
        if quality_kind == "accuracy":
            best = ", ".join(f"{100 * q:.0f}%@{r:.2f}" for q, r in record["front"][:6])
        else:  # agreement: PSNR to the uncached images, capped at 40 dB, / 40
            best = ", ".join(f"{AGREEMENT_CAP_DB * q:.1f}dB@{r:.2f}" for q, r in record["front"][:6])
        typer.echo(f"gen {record['generation']:3d}: {record['new']:3d} new evaluations "
                   f"({record['seconds']:.0f} s); front ({quality_kind}@MACs): {best}")

    front = search.run(generations, progress=report)
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
