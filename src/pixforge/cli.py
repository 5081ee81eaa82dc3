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


def main() -> None:
    from pixforge.errors import PixforgeError

    try:
        app()
    except PixforgeError as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
