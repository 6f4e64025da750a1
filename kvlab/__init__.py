"""kvlab: reproduce, trace, explain and fix the autograd "KV-cache memory leak" of LLM inference.

The pieces, bottom up: :mod:`kvlab.config` (HF-named config, presets), :mod:`kvlab.model` (a
Mistral-style decoder), :mod:`kvlab.caches` (KV-cache designs), :mod:`kvlab.checkpoint` (HF-layout
safetensors I/O), :mod:`kvlab.loaders` (the four loaders of the story), :mod:`kvlab.generate` (the
decode loop), and the memory tools that find the cause.
"""

from .config import MistralConfig, preset
from .errors import CacheOverflowError, CheckpointError, ConfigError

__version__ = "0.1.0"
__all__ = ["MistralConfig", "preset", "CheckpointError", "ConfigError", "CacheOverflowError", "__version__"]
