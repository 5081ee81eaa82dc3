"""The `pixforge` command line. Each command imports its heavy modules inside its body,
so `pixforge --help` stays fast."""
from __future__ import annotations

import typer

app = typer.Typer(
    name="pixforge",
    help="Efficient PixArt-family text-to-image diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    from pixforge.errors import PixforgeError

    try:
        app()
    except PixforgeError as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
