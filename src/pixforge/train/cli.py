"""`pixforge train`: every TrainConfig field is a flag (same name, dashes), or comes from a
TOML/JSON file given with --config; flags override the file. Light to import."""
from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

import typer

from pixforge.errors import PixforgeError
from pixforge.train.config import TrainConfig, config_fields, load_config_file

HELP = """Train a PixArt transformer or its VAE; re-running the same command resumes it.

Examples:

  # 1. a VAE on the shapes world (64² crops), then 2. the transformer on its latents
  pixforge train --target vae --output-dir runs/vae --steps 3000 --crop-size 64 --lr 1e-3
  pixforge train --output-dir runs/t2i --vae runs/vae/final/vae --model shapes-10m --steps 20000

  # your own images: a folder with metadata.jsonl ({"file_name": ..., "text": ...} per line)
  pixforge train --data my_images/ --vae runs/vae/final/vae --output-dir runs/mine

  # settings from a file (flags override it); several processes (DDP, gloo on CPU)
  pixforge train --config recipe.toml
  torchrun --standalone --nproc_per_node 2 -m pixforge.cli train --config recipe.toml

  # plot the curves of a run
  pixforge train --plot runs/t2i
"""


def _is_tuple(annotation) -> bool:
    return "tuple" in str(annotation)


def _parse_value(name: str, text: str, default):
    if isinstance(default, tuple):
        cast = type(default[0]) if default else str
        try:
            return tuple(cast(part) for part in text.split(",") if part.strip())
        except ValueError as error:
            raise PixforgeError(f"--{name.replace('_', '-')} {text!r}: expected comma-separated {cast.__name__}s") from error
    return text


def train_command(**options) -> None:
    plot = options.pop("plot")
    config_file = options.pop("config")
    if plot:
        from pixforge.train.plot import plot_run

        path = plot_run(plot)
        typer.echo(f"wrote {path}")
        return
    values = load_config_file(config_file) if config_file else {}
    for name, value in options.items():
        if value is not None:
            default = _default(config_fields()[name])
            values[name] = _parse_value(name, value, default) if isinstance(default, tuple) else value
    config = TrainConfig(**values)
    import logging

    from pixforge.train.loop import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = train(config)
    state = "stopped (re-run the same command to resume)" if result.stopped_early else "finished"
    typer.echo(f"{state} at step {result.step}; output in {result.output_dir}")


def _default(field: dataclasses.Field):
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def _build_signature() -> inspect.Signature:
    parameters = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[Path],
                          default=typer.Option(None, "--config", help="TOML or JSON file of TrainConfig fields.")),
        inspect.Parameter("plot", inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[Path],
                          default=typer.Option(None, "--plot", help="Draw the loss / lr / throughput curves of RUN and exit.")),
    ]
    hints = typing.get_type_hints(TrainConfig)
    for name, field in config_fields().items():
        default = _default(field)
        annotation = hints[name]
        if _is_tuple(annotation):
            shown = ",".join(str(v) for v in default)
            annotation, help_text = typing.Optional[str], f"comma-separated (default {shown})"
        elif annotation is bool:
            annotation, help_text = typing.Optional[bool], f"(default {default})"
        else:
            annotation, help_text = typing.Optional[annotation], f"(default {default})"
        flag = "--" + name.replace("_", "-")
        option = typer.Option(None, f"{flag}/--no-{name.replace('_', '-')}" if hints[name] is bool else flag, help=help_text)
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=option))
    return inspect.Signature(parameters)


train_command.__signature__ = _build_signature()
train_command.__doc__ = HELP
