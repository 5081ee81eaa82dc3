"""`pixforge serve`: one flag per ServeSettings field, plus where to listen and what to load.

Light to import: fastapi and uvicorn are imported once the flags have been checked, and a
bind that would expose the server without an API key is refused before a model loads.
"""
import os
from typing import List, Optional

import typer

from pixforge.errors import PixforgeError
from pixforge.serve.settings import MIN_API_KEY_LENGTH, ServeSettings, check_bind

HELP = """Serve models over HTTP: OpenAI- and A1111-shaped APIs, a web page at /, metrics.

Examples:

  pixforge serve --model out/model                      # http://127.0.0.1:7860

  curl -s localhost:7860/v1/images/generations -H 'Content-Type: application/json' \\
       -d '{"prompt": "a red circle", "size": "128x128", "seed": 1}'

  export PIXFORGE_KEY=$(openssl rand -hex 24)
  pixforge serve --model out/model --host 0.0.0.0 --api-key-env PIXFORGE_KEY --max-queue 32
"""


def serve_command(
    model: Optional[List[str]] = typer.Option(None, "--model", help="Model folder (repeat to serve several, one queue each); default: the embedded model."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Not loopback needs --api-key-env (or --insecure)."),
    port: int = typer.Option(7860, "--port", help="TCP port."),
    max_queue: int = typer.Option(16, "--max-queue", help="Jobs waiting per model; more get 429 with Retry-After."),
    max_batch: int = typer.Option(8, "--max-batch", help="Images per pipeline call when compatible requests are batched (1: no batching)."),
    max_images: int = typer.Option(8, "--max-images", help="Images per request (n, batch_size x n_iter)."),
    max_side: int = typer.Option(1024, "--max-side", help="Largest width or height in pixels."),
    max_steps: int = typer.Option(100, "--max-steps", help="Most denoising steps per request."),
    max_guidance: float = typer.Option(50.0, "--max-guidance", help="Largest CFG scale."),
    max_prompt_chars: int = typer.Option(4000, "--max-prompt-chars", help="Longest prompt or negative prompt."),
    max_body_bytes: int = typer.Option(256 * 1024, "--max-body-bytes", help="Largest request body (bigger: 413)."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds a request may wait (queue + generation); then 504."),
    batch_window: float = typer.Option(0.0, "--batch-window", help="Seconds the worker waits for more compatible requests before a call."),
    shutdown_grace: float = typer.Option(30.0, "--shutdown-grace", help="On Ctrl-C, seconds queued and running jobs get to finish."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Name of an environment variable holding the API key (Bearer)."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without an API key."),
    cors_origin: Optional[List[str]] = typer.Option(None, "--cors-origin", help="Allow browser calls from this origin (repeatable; default: CORS off)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 | auto."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N | auto (a GPU where one is visible)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: critical | error | warning | info | debug."),
) -> None:
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise PixforgeError(f"--api-key-env {api_key_env}: the environment variable {api_key_env} is not set or empty")
        if len(api_key) < MIN_API_KEY_LENGTH:
            typer.echo(f"warning: the API key in {api_key_env} has {len(api_key)} characters; "
                       f"use at least {MIN_API_KEY_LENGTH} random ones", err=True)
    if not 0 < port < 65536:
        raise PixforgeError(f"--port {port} is out of range: use 1..65535")
    settings = ServeSettings(
        max_queue=max_queue, max_batch=max_batch, max_images=max_images, max_side=max_side, max_steps=max_steps,
        max_guidance=max_guidance, max_prompt_chars=max_prompt_chars, max_body_bytes=max_body_bytes,
        timeout_s=timeout, batch_window_s=batch_window, shutdown_grace_s=shutdown_grace, api_key=api_key,
        cors_origins=tuple(cors_origin or ()),
    )
    check_bind(host, api_key, insecure)
    try:
        from pixforge.serve.app import create_app
        from pixforge.serve.server import run
    except ImportError as error:
        raise PixforgeError(f"pixforge serve needs the serve extra ({error.name} is missing): "
                            f"pip install 'pixforge[serve]'") from None
    from pixforge.sampling.pipeline import load_pipeline

    pipes = {}
    for folder in model or [None]:
        pipe = load_pipeline(folder, precision=precision, device=device)
        if pipe.model_name in pipes:
            raise PixforgeError(f"two models are named {pipe.model_name!r} ({folder}); each needs its own name")
        pipes[pipe.model_name] = pipe
    app = create_app(pipes, settings)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"serving {', '.join(pipes)} on http://{shown}:{port} (auth: {'on' if api_key else 'off'})")
    run(app, host, port, settings, log_level=log_level)


serve_command.__doc__ = HELP
