"""The few exception types kvlab raises on bad input.

One type per kind of mistake, each message naming the file and the tensor or field at fault, so that
a user who points kvlab at a broken checkpoint learns what is wrong without reading a traceback.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint directory, ``config.json`` or safetensors file cannot be used as asked.

    Raised before any model is returned: a load either succeeds completely or raises this.
    """


class ConfigError(CheckpointError):
    """A configuration value is missing, of the wrong type, or inconsistent with another."""


class CacheOverflowError(RuntimeError):
    """A fixed-capacity KV cache was asked to hold more positions than it was built for."""
