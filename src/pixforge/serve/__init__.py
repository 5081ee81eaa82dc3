"""`pixforge serve`: an HTTP server for PixArt pipelines (OpenAI- and A1111-shaped APIs + a web page).

    from pixforge.serve.app import create_app          # needs the `serve` extra (fastapi, uvicorn)
    app = create_app(pipe, ServeSettings(max_queue=16))

Layout: `settings` (limits, security; light to import), `schemas` (pydantic request models,
validated before anything is queued), `jobs` (one bounded queue + one worker thread per
model, batching compatible requests into one pipeline call), `metrics` (Prometheus text),
`app` (FastAPI routes), `server` (uvicorn, in the foreground or a background thread),
`cli` (the typer command). Only `app` and `server` import fastapi / uvicorn, so importing
this package (and `pixforge.cli`) stays cheap. Design: docs/serving.md.
"""
from pixforge.serve.settings import ServeSettings

__all__ = ["ServeSettings"]
