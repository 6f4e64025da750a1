"""Model configuration, with the field names of Hugging Face's Mistral ``config.json``.

Using HF's names means a downloaded checkpoint's ``config.json`` is read as is, and a kvlab checkpoint
opens in transformers. Derived sizes (``head_dim``, ``num_key_value_groups``) are computed once.

A ``config.json`` means what it means to transformers, for each ``model_type`` kvlab accepts: a key it
leaves out takes transformers' default for that model type (:data:`HF_DEFAULTS`), and a Llama model
attends to every position -- ``LlamaModel`` never applies a sliding window, whatever the file says,
while a Mistral file without the key gets transformers' 4096.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint_files import read_json
from .errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# Keys an HF Mistral/Llama config.json carries that do not change the computation kvlab does.
_IGNORED_KEYS = {
    "architectures", "transformers_version", "bos_token_id", "eos_token_id",
    "pad_token_id", "initializer_range", "use_cache", "attention_dropout", "output_attentions",
    "output_hidden_states", "return_dict", "_name_or_path", "pretraining_tp",
    "layer_types", "max_window_layers", "use_sliding_window", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class",
}
# Keys whose only accepted value is the one kvlab implements.
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "rope_scaling": (None,),
    "attention_bias": (False,),
    "mlp_bias": (False,),
}
#: transformers' defaults (its ``MistralConfig`` / ``LlamaConfig``) for the keys a config.json may leave
#: out, per ``model_type``. Llama has no ``sliding_window`` at all; its ``num_key_value_heads`` defaults
#: to ``num_attention_heads`` (as does an explicit null for both types).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": {"head_dim": None, "sliding_window": 4096, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0, "max_position_embeddings": 4096 * 32, "tie_word_embeddings": False},
    "llama": {"head_dim": None, "num_key_value_heads": None, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "max_position_embeddings": 2048, "tie_word_embeddings": False},
}


def dtype_named(name: str) -> torch.dtype:
    """``"bfloat16"`` (or ``"torch.bfloat16"``) -> ``torch.bfloat16``, for the dtypes kvlab runs in."""
    try:
        return DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class MistralConfig:
    """Shape and numerics of a Mistral-style decoder.

    ``head_dim=None`` means ``hidden_size // num_attention_heads`` (HF's rule); ``sliding_window=None``
    means full causal attention.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336  # SwiGLU width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8  # fewer than query heads: grouped-query attention
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096  # Mistral v0.1 attends to the last 4096 positions only
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False  # True: lm_head shares embed_tokens' weight
    torch_dtype: str = "bfloat16"  # dtype the weights are stored and run in

    def __post_init__(self) -> None:
        self._validate()
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    # ----------------------------------------------------------------- derived sizes
    @property
    def num_key_value_groups(self) -> int:
        """How many query heads share one KV head (``n_rep`` in ``repeat_kv``)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    def replace(self, **changes: Any) -> MistralConfig:
        """A copy with some fields changed; a derived ``head_dim`` is derived again."""
        derived = self.head_dim == self.hidden_size // self.num_attention_heads
        if derived and "head_dim" not in changes and {"hidden_size", "num_attention_heads"} & set(changes):
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- validation
    def _validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"config field {name!r}: {why} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(name, "must be a positive integer")
        for name in ("head_dim", "sliding_window"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise bad(name, "must be a positive integer or null")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise bad(name, "must be a positive number")
        if not isinstance(self.tie_word_embeddings, bool):
            raise bad("tie_word_embeddings", "must be true or false")
        if not isinstance(self.torch_dtype, str) or self.torch_dtype not in DTYPES:
            raise bad("torch_dtype", f"must be one of {sorted(DTYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", "must divide num_attention_heads")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise bad("hidden_size", "must be divisible by num_attention_heads when head_dim is null")
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if head_dim % 2:
            raise bad("head_dim", "must be even for rotary embeddings")

    # ----------------------------------------------------------------- config.json
    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content, readable by transformers' ``MistralConfig``."""
        data = dataclasses.asdict(self)
        data.update(architectures=["MistralForCausalLM"], model_type="mistral", hidden_act="silu")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> MistralConfig:
        """Build from a ``config.json`` mapping with transformers' meaning (see the module docstring);
        any unknown or unsupported key is an error."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        model_type = data.pop("model_type", "mistral")
        if not isinstance(model_type, str) or model_type not in HF_DEFAULTS:
            raise ConfigError(f"{source}: field 'model_type' must be one of {tuple(HF_DEFAULTS)}; "
                              f"kvlab implements no other (got {model_type!r})")
        if "torch_dtype" not in data and "dtype" in data:  # transformers >= 5 writes "dtype"
            data["torch_dtype"] = data.pop("dtype")
        data.pop("dtype", None)
        if "torch_dtype" in data and data["torch_dtype"] is None:  # HF's "unspecified" means float32
            data["torch_dtype"] = "float32"
        rope = data.pop("rope_parameters", None)  # transformers >= 5 nests rope_theta here
        if rope is not None:
            if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
                raise ConfigError(f"{source}: field 'rope_parameters' must describe plain (default) RoPE, got {rope!r}")
            if "rope_theta" in rope:
                data.setdefault("rope_theta", rope["rope_theta"])
        for key, allowed in _REQUIRED_VALUES.items():
            if key in data and data.pop(key) not in allowed:
                raise ConfigError(f"{source}: field {key!r} must be one of {allowed}; kvlab implements no other")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - _IGNORED_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unexpected field(s) {unknown}")
        if model_type == "llama":
            data["sliding_window"] = None  # LlamaModel ignores the key: full causal attention
        for key, value in HF_DEFAULTS[model_type].items():
            data.setdefault(key, value)
        if data["num_key_value_heads"] is None and "num_attention_heads" in data:
            data["num_key_value_heads"] = data["num_attention_heads"]
        missing = sorted(name for name in known if name not in data and name != "torch_dtype")
        if missing:
            raise ConfigError(f"{source}: missing field(s) {missing}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ConfigError, TypeError, ValueError) as exc:  # TypeError: e.g. an unhashable torch_dtype
            raise ConfigError(f"{source}: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MistralConfig:
        """Read a ``config.json``: a regular file (a FIFO or a directory is refused unopened) of strict JSON."""
        path = Path(path)
        return cls.from_dict(read_json(path, "config.json", ConfigError), source=str(path))


PRESETS: dict[str, MistralConfig] = {
    # Tests and CPU notebooks: a decode step takes about a millisecond on one core.
    "tiny": MistralConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, sliding_window=None,
                          max_position_embeddings=8192, torch_dtype="float32"),
    # The CPU reference toy of the incident write-up: 4 layers x hidden 512, 8 heads / 2 KV heads.
    "small": MistralConfig(vocab_size=32000, hidden_size=512, intermediate_size=1792, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, sliding_window=None,
                           max_position_embeddings=8192, torch_dtype="float32"),
    # Mistral-7B-v0.1's real shape (GPU only: 14.5 GB of bf16 weights).
    "mistral-7b": MistralConfig(),
}


def preset(name: str, **overrides: Any) -> MistralConfig:
    """A named preset, optionally with some fields changed (``preset("tiny", sliding_window=64)``)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
    return base.replace(**overrides) if overrides else base
