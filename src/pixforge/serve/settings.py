"""Server limits and security settings: one frozen dataclass, one CLI flag per field.

Light to import (no fastapi, no torch): `pixforge serve` checks its flags, and refuses an
unsafe bind address, before loading a model.
"""
from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, fields

from pixforge.errors import PixforgeError

LOOPBACK_NAMES = ("localhost",)
MIN_API_KEY_LENGTH = 16


@dataclass(frozen=True)
class ServeSettings:
    """Limits apply per request and are checked before a job is queued (bad input -> 422).

    max_queue: jobs waiting per model (the running batch not counted); more -> 429.
    max_batch: images per pipeline call; compatible requests (same size, steps, guidance,
        sampler, cache) share a call up to this many images. 1 turns batching off.
    max_images: images per request (OpenAI `n`, A1111 `batch_size * n_iter`).
    max_side, max_steps, max_guidance, max_prompt_chars: per-field limits.
    max_body_bytes: a bigger request body is refused (413) before it is parsed.
    timeout_s: a request waiting longer (queued + running) gets 504 and its job is dropped.
    batch_window_s: how long the worker waits for more compatible jobs before a call
        (0: take what is queued; batches still form whenever jobs wait behind a running one).
    shutdown_grace_s: on shutdown, queued jobs still run for this long; then they, and a
        batch still running, fail with 503.
    api_key: Bearer token every API route requires (None: no auth). Never printed.
    cors_origins: origins allowed to call the API from a browser (empty: CORS off).
    """

    max_queue: int = 16
    max_batch: int = 8
    max_images: int = 8
    max_side: int = 1024
    max_steps: int = 100
    max_guidance: float = 50.0
    max_prompt_chars: int = 4000
    max_body_bytes: int = 256 * 1024
    timeout_s: float = 300.0
    batch_window_s: float = 0.0
    shutdown_grace_s: float = 30.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self):
        positive_ints = ("max_queue", "max_batch", "max_images", "max_side", "max_steps", "max_prompt_chars",
                         "max_body_bytes")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PixforgeError(f"--{_flag(name)} {value!r} is invalid: use an int >= 1")
        for name, low in (("max_guidance", 0.0), ("timeout_s", 1e-3), ("batch_window_s", 0.0), ("shutdown_grace_s", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
                raise PixforgeError(f"--{_flag(name)} {value!r} is invalid: use a finite number >= {low:g}")
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key.strip()):
            raise PixforgeError("the API key is empty; set the variable named by --api-key-env to a secret")
        if not all(isinstance(origin, str) and origin for origin in self.cors_origins):
            raise PixforgeError(f"--cors-origin values must be non-empty strings, got {self.cors_origins!r}")

    def __repr__(self) -> str:  # the key must never reach a log line
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["api_key"] = None if self.api_key is None else "***"
        return "ServeSettings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def _flag(name: str) -> str:
    return name.removesuffix("_s").replace("_", "-")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; any other name or address is not loopback."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name could resolve to anything: treat it as public


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to expose the server beyond this machine without an API key, unless told to."""
    if is_loopback(host) or api_key is not None or insecure:
        return
    raise PixforgeError(
        f"refusing to bind {host!r}, which is not a loopback address, without an API key: "
        f"export a secret in a variable and pass --api-key-env VAR, or pass --insecure to serve "
        f"anyone who can reach this port (or use --host 127.0.0.1)"
    )


__all__ = ["ServeSettings", "is_loopback", "check_bind", "MIN_API_KEY_LENGTH"]
