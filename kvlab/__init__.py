"""kvlab: reproduce, trace, explain and fix the autograd "KV-cache memory leak" of LLM inference.

Three floors, each importing only the ones below it (the contracts in ``pyproject.toml`` check this):

- **the core**, this package's top level: :mod:`kvlab.config` (HF-named config, presets),
  :mod:`kvlab.model` (a Mistral-style decoder), :mod:`kvlab.caches` (one file per KV-cache design),
  :mod:`kvlab.checkpoint` (HF-layout safetensors), :mod:`kvlab.loaders` (the four loaders of the
  story), :mod:`kvlab.generate` (the decode loop) and :mod:`kvlab.fastpath` (the compiled one);
- **the memory tools**, :mod:`kvlab.memory`, beside the core and importing nothing else of kvlab, so
  they serve any PyTorch decode loop: exact tracer, retention explainer, leak guard, validator;
- **the study**, :mod:`kvlab.study` (measured runs, analytic model, plots, recorded results), with
  :mod:`kvlab.experiments` (GPU-scale suites) and the fronts (:mod:`kvlab.cli`, reports) on top.
"""

from .config import MistralConfig, preset
from .errors import CacheOverflowError, CheckpointError, ConfigError

__version__ = "0.1.0"
__all__ = ["MistralConfig", "preset", "CheckpointError", "ConfigError", "CacheOverflowError", "__version__"]
