"""The `pixforge` command line. Each command imports its heavy modules inside its body,
so `pixforge --help` stays fast."""
from __future__ import annotations

import sys
from contextlib import contextmanager

import typer

app = typer.Typer(
    name="pixforge",
    help="Efficient PixArt-family text-to-image diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' as users write it (e.g. '768x512') -> (width, height)."""
    from pixforge.errors import PixforgeError

    parts = text.lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise PixforgeError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 512x512")
    width, height = (int(p) for p in parts)
    if width < 1 or height < 1:
        raise PixforgeError(f"size {text!r} must be positive")
    return width, height


@app.command("info")
def info_command(
    source: str = typer.Argument(..., help="A preset name (tiny, XL/2, pixart-sigma-1024-ms, ...) or a checkpoint path."),
    size: str = typer.Option(None, "--size", help="Image size WxH for the FLOP count (default: the model's native size)."),
    text_tokens: int = typer.Option(120, "--text-tokens", help="Text length for the cross-attention FLOPs."),
) -> None:
    """Print a transformer's config, parameter count and FLOPs per forward.

    Examples:

      pixforge info XL/2 --size 512x512

      pixforge info path/to/PixArt-XL-2-512x512.pth
    """
    from pathlib import Path

    from pixforge.models.flops import count_parameters, forward_flops
    from pixforge.models.presets import get_preset

    if Path(source).exists():
        from pixforge.models.convert import load_transformer

        config = load_transformer(source).config
    else:
        config = get_preset(source)
    native = config.sample_size * 8
    width, height = parse_size(size) if size else (native, native)
    flops = forward_flops(config, height, width, text_tokens=text_tokens)
    typer.echo(f"source: {source}")
    for key, value in config.to_dict().items():
        typer.echo(f"  {key}: {value}")
    typer.echo(f"parameters: {count_parameters(config):,}")
    typer.echo(f"tokens at {width}x{height}: {int(flops['tokens'])}")
    typer.echo(f"GFLOPs per forward (batch 1): {flops['total'] / 1e9:.2f}")
    typer.echo(f"GFLOPs per denoising step with cached text K/V: {flops['total_cached_text'] / 1e9:.2f}")


@app.command("convert")
def convert_command(
    source: str = typer.Argument(..., help="Checkpoint: diffusers folder, .safetensors or original PixArt .pth."),
    destination: str = typer.Argument(..., help="Output folder (diffusers layout) or a .safetensors file."),
    config: str = typer.Option(None, "--config", help="Preset name when the source has no config.json."),
    layout: str = typer.Option("diffusers", "--layout", help="Key layout for a single .safetensors output: diffusers | original."),
    dtype: str = typer.Option("fp32", "--dtype", help="Stored precision: fp32 | bf16 | fp16."),
) -> None:
    """Convert a PixArt transformer checkpoint to the diffusers layout (or a single file).

    Examples:

      pixforge convert PixArt-XL-2-512x512.pth out/transformer --config pixart-alpha-512

      pixforge convert out/transformer model.safetensors --dtype bf16
    """
    import torch

    from pixforge.errors import PixforgeError
    from pixforge.models.convert import load_transformer, save_single_file

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise PixforgeError(f"unknown dtype {dtype!r}; choose one of {', '.join(dtypes)}")
    model = load_transformer(source, config=config, torch_dtype=dtypes[dtype])
    if destination.endswith(".safetensors"):
        save_single_file(model, destination, layout=layout)
    else:
        model.save_pretrained(destination)
    typer.echo(f"wrote {destination} ({model.num_parameters():,} parameters, {dtype})")


@app.command("eval")
def eval_command(
    images: str = typer.Option(None, "--images", help="Folder of images with metadata.jsonl (file_name, text[, scene])."),
    model: str = typer.Option(None, "--model", help="Model folder to generate with (needs --prompts)."),
    prompts: str = typer.Option(None, "--prompts", help="Prompt file, one JSON per line (GenEval layout or {'prompt': ...})."),
    out: str = typer.Option(None, "--out", help="Write the full report (per category and per image) as JSON here."),
    plot: str = typer.Option(None, "--plot", help="Save a bar chart of per-category accuracy (PNG) here."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first prompt's image; prompt i uses seed + i."),
    size: str = typer.Option("128x128", "--size", help="Generation size WxH for prompts that do not name one."),
    save_images: str = typer.Option(None, "--save-images", help="Keep generated images (+ metadata.jsonl) here."),
    limit: int = typer.Option(None, "--limit", help="Score only the first N records."),
) -> None:
    """Compositional accuracy in the shapes world, per category (GenEval-style checker).

    Examples:

      pixforge shapes export --split test --n 600 data/shapes-test

      pixforge eval --images data/shapes-test --out results.json --plot results.png

      pixforge eval --model out/model --prompts data/shapes-test/prompts_geneval.jsonl
    """
    import json

    from pixforge.errors import PixforgeError
    from pixforge.eval.report import format_table, generate_and_score, save_plot, score_folder

    if (images is None) == (model is None):
        raise PixforgeError("give exactly one of --images DIR or --model DIR (with --prompts FILE)")
    if images is not None:
        results = score_folder(images, limit=limit)
    else:
        if prompts is None:
            raise PixforgeError("--model needs --prompts FILE (e.g. from `pixforge shapes export`)")
        width, height = parse_size(size)
        results = generate_and_score(model, prompts, seed=seed, height=height, width=width,
                                     save_images=save_images, limit=limit)
    typer.echo(format_table(results))
    if out:
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1))
        typer.echo(f"wrote {out}")
    if plot:
        typer.echo(f"wrote {save_plot(results, plot)}")


@app.command("generate")
def generate_command(
    prompt: str = typer.Argument(..., help="What to draw."),
    num_images: int = typer.Option(1, "-n", "--num-images", help="Number of images (seeds SEED, SEED+1, ...)."),
    size: str = typer.Option(None, "--size", help="WIDTHxHEIGHT in pixels (default: the model's native size)."),
    steps: int = typer.Option(None, "--steps", help="Denoising steps (default 20; 4 for lcm)."),
    sampler: str = typer.Option(None, "--sampler", help="dpm++ | ddim | euler | euler-a | lcm | a diffusers scheduler (default: the model's)."),
    cfg: float = typer.Option(None, "--cfg", help="Classifier-free guidance scale (default: the --cache schedule's own where it records one, else the model's: 4.5, the embedded model 2.5; <= 1 turns it off)."),
    seed: int = typer.Option(-1, "--seed", help="Seed of the first image; -1 picks one at random (printed)."),
    negative: str = typer.Option("", "--negative", help="Negative prompt."),
    model: str = typer.Option(None, "--model", help="Model folder (diffusers PixArt pipeline or pixforge); default: the embedded model."),
    out_dir: str = typer.Option("outputs", "-o", "--out-dir", help="Folder for the PNGs (created if needed)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 | auto (the faster one on this machine)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N | auto (a GPU where one is visible)."),
    binning: bool = typer.Option(False, "--bin/--no-bin", help="Generate at PixArt's nearest aspect-ratio bucket, resize to --size."),
    cache: str = typer.Option("none", "--cache", help="Feature caching across steps: fora:N | delta-dit:... | toca:... | teacache:T | first-block:T | late-dense:F | cfg-cache:N | schedule.json | a schedule the model ships (the default model: ecad, ecad-fast), and POLICY+cfg-cache:N, POLICY+icc:R (docs/acceleration.md)."),
    layout: str = typer.Option("none", "--layout", help="Regional prompting for the first 60% of the steps: auto (a spatial relation in the prompt, 'A left of B', 'A above B', ... -> each object prompted in its half; with a model that names a layout background, such as the embedded one, also 'three/four Xs' -> one box per X) | none (docs/generation.md)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Generate images from a prompt; write PNGs with their settings embedded (A1111 'parameters').

    Examples:

      pixforge generate "a red circle left of a blue square" --model out/model

      pixforge generate "three yellow stars" -n 4 --size 192x128 --seed 42 --steps 30 --cfg 6 -o shots

      pixforge generate "a cat" --model PixArt-Sigma-XL-2-512-MS --sampler euler-a --negative "blurry"

      pixforge generate "two green squares" --cache fora:2
      pixforge generate "two green squares" --cache ecad

      pixforge generate "a red circle to the left of a blue square" --layout auto

      pixforge generate "a cat" --model PixArt-Sigma-XL-2-1024-MS --device cuda --precision bf16
    """
    from pathlib import Path

    width, height = parse_size(size) if size else (None, None)
    with _collector_paused():
        from pixforge.sampling.metadata import save_png
        from pixforge.sampling.pipeline import load_pipeline

        pipe = load_pipeline(model, precision=precision, device=device)
    result = pipe(
        prompt, negative_prompt=negative, height=height, width=width, num_inference_steps=steps,
        guidance_scale=cfg, sampler=sampler, seed=seed, num_images_per_prompt=num_images, progress=not quiet,
        use_resolution_binning=binning, cache=cache, layout=layout,
    )
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name.split("-")[0]) for p in folder.glob("*.png") if p.name.split("-")[0].isdigit()]
    first = max(taken, default=-1) + 1
    for i, (image, info) in enumerate(zip(result.images, result.metadata)):
        typer.echo(str(save_png(image, folder / f"{first + i:05d}-{info.seed}.png", info)))
    typer.echo(f"seed: {result.seeds[0]}")
    global _fast_exit
    _fast_exit = True  # every PNG is written (atomically) and closed: nothing left for a teardown to do


shapes_app = typer.Typer(help="The shapes world: export images, captions and GenEval prompt files.",
                         no_args_is_help=True)
app.add_typer(shapes_app, name="shapes")


@shapes_app.command("export")
def shapes_export_command(
    out_dir: str = typer.Argument(..., help="Output folder: PNGs, metadata.jsonl, prompts_geneval.jsonl."),
    split: str = typer.Option("test", "--split", help="train | validation | test."),
    n: int = typer.Option(600, "--n", help="Number of samples."),
    start: int = typer.Option(0, "--start", help="Index of the first sample within the split."),
    sizes: str = typer.Option("128x128", "--sizes", help="Canvas sizes WxH, comma-separated; one is drawn per sample."),
    paraphrase: bool = typer.Option(False, "--paraphrase", help="Paraphrased captions instead of the canonical grammar."),
    background_prob: float = typer.Option(0.0, "--background-prob", help="Chance a non-background caption names a background."),
    holdout: str = typer.Option("", "--holdout", help="colour:shape pairs never in train, comma-separated (purple:triangle)."),
    mix: str = typer.Option("", "--mix", help="Category weights, e.g. position=3,counting=2 (others 1)."),
    seed: int = typer.Option(0, "--seed", help="World seed (another value gives another fixed dataset)."),
    prompts_only: bool = typer.Option(False, "--prompts-only", help="Write only OUT_DIR/prompts_geneval.jsonl."),
) -> None:
    """Export a split of the shapes world (Hugging Face imagefolder layout + GenEval prompts).

    Examples:

      pixforge shapes export data/shapes-test --split test --n 600

      pixforge shapes export data/train --split train --n 50000 --sizes 128x128,144x112,112x144 --holdout purple:triangle
    """
    from pathlib import Path

    from pixforge.errors import PixforgeError
    from pixforge.shapes.export import PROMPTS, export_split, write_geneval_prompts
    from pixforge.shapes.world import WorldConfig, parse_mix

    pairs = []
    for item in filter(None, (p.strip() for p in holdout.split(","))):
        if item.count(":") != 1:
            raise PixforgeError(f"--holdout item {item!r} is not colour:shape, e.g. purple:triangle")
        pairs.append(tuple(item.split(":")))
    config = WorldConfig(
        canvas_sizes=tuple(parse_size(s) for s in sizes.split(",")), mix=parse_mix(mix), paraphrase=paraphrase,
        background_prob=background_prob, holdout=tuple(pairs), seed=seed,
    )
    if prompts_only:
        path = write_geneval_prompts(Path(out_dir) / PROMPTS, split, n, config, start=start)
        typer.echo(f"wrote {n} prompts to {path}")
    else:
        path = export_split(out_dir, split, n, config, start=start)
        typer.echo(f"wrote {n} {split} samples to {path}")


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                         "help_option_names": []})
def bench_command(ctx: typer.Context, name: str = typer.Argument(None)) -> None:
    """Run a benchmark from benchmarks/ (no NAME: list them).

    `pixforge bench NAME ARGS...` is `python benchmarks/NAME.py ARGS...`: each prints its ratios
    against a baseline measured in the same run, median and spread. `pixforge bench NAME --help`
    shows a benchmark's options.

      pixforge bench generate_cli --repeats 5

      pixforge bench cache --prompts 300 --repeats 3
    """
    from pixforge.eval.bench import benchmarks_dir, list_benchmarks, run_benchmark

    folder = benchmarks_dir()
    if name is None or name in ("--help", "-h", "--list"):
        typer.echo(f"pixforge bench NAME [ARGS...]: the benchmarks in {folder}\n")
        for script, line in list_benchmarks(folder).items():
            typer.echo(f"  {script:<22} {line}")
        return
    run_benchmark(folder, name, list(ctx.args))


def _register_train() -> None:
    from pixforge.train.cli import train_command

    app.command("train", help=train_command.__doc__)(train_command)


_register_train()


def _register_search_cache() -> None:
    from pixforge.accel.cli import rescore_cache_command, search_cache_command

    app.command("search-cache", help=search_cache_command.__doc__)(search_cache_command)
    app.command("rescore-cache", help=rescore_cache_command.__doc__)(rescore_cache_command)


_register_search_cache()


def _register_serve() -> None:
    from pixforge.serve.cli import serve_command

    app.command("serve", help=serve_command.__doc__)(serve_command)


_register_serve()


@contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while torch is imported and the model loaded.

    Importing torch and building the pipeline allocate ~10^6 long-lived objects; the collector
    runs ~380 times over them meanwhile (3 full collections), 0.29-0.47 s of a `pixforge
    generate` on the 2-core machine (measured with gc.callbacks; docs/training.md, "Speed"). Nothing
    made in these phases is garbage worth collecting. In the console process the survivors are
    then moved out of the collector's view (gc.freeze, as long-lived servers do after start-up),
    so later collections scan only what the generation itself allocates; an in-process call (tests,
    notebooks) only gets the collector back as it was.
    """
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if _console:
            gc.freeze()
        if was_enabled:
            gc.enable()


# Whether `main` (the console entry point) is running this process's command.
_console = False

# Set by a command whose process holds nothing that needs an orderly interpreter teardown (no
# worker processes, no open files): `main` then leaves with os._exit once output is flushed.
# Tearing down an interpreter with torch loaded costs ~0.35 s on the 2-core machine
# (`python -c "import torch"` 1.93-2.22 s; with os._exit(0) 1.60-1.74 s), a tenth of a
# `pixforge generate`. Only the console entry point does this, never an in-process call.
_fast_exit = False


def main() -> None:
    from pixforge.errors import PixforgeError

    global _fast_exit, _console
    _fast_exit = False  # only the command this call runs may set it (in-process CLI calls set it too)
    _console = True
    try:
        app()
        code = 0
    except PixforgeError as error:
        typer.echo(f"error: {error}", err=True)
        code = 2
    except SystemExit as exit_:
        code = exit_.code
    finally:
        _console = False
    if _fast_exit and (code is None or isinstance(code, int)):
        import logging
        import os

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a reader that went away (`| head -1`), a closed stream
                pass
        os._exit(code or 0)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
