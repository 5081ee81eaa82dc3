"""Run an app with uvicorn: in the foreground (`pixforge serve`) or in a background thread
(tests, benchmarks, notebooks).

    with background_server(create_app(pipe)) as url:   # a free loopback port
        httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red circle"})
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import uvicorn

from pixforge.serve.settings import ServeSettings


def run(app, host: str, port: int, settings: ServeSettings, log_level: str = "info") -> None:
    """Serve until Ctrl-C / SIGTERM. Open requests then get `shutdown_grace_s` to finish, after
    which they are cancelled; the app's shutdown then fails whatever is still queued."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=settings.shutdown_grace_s,
                access_log=log_level == "debug")


@contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                      start_timeout_s: float = 30.0, shutdown_grace_s: float = 10.0) -> Iterator[str]:
    """Yield the base URL of `app` served from a thread; port 0 picks a free port."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=shutdown_grace_s)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="pixforge-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=start_timeout_s)


__all__ = ["run", "background_server"]
