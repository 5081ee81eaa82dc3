"""Errors raised at pixforge's boundaries (CLI, pipeline call, loaders).

Every message names the bad value and what would be accepted, so the CLI can print it
without a traceback.
"""
from __future__ import annotations


class PixforgeError(ValueError):
    """Bad input given to pixforge: a value, a file or a combination of options."""


class CheckpointError(PixforgeError):
    """A checkpoint that cannot be loaded: corrupt, unsafe, or not matching the model."""
