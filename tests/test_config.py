"""A config.json means to kvlab what it means to transformers, for every model_type kvlab accepts.

Each accepted ``model_type`` is checked against transformers itself: a tiny random model of that type
is saved by transformers, kvlab loads the directory, and logits must agree -- with a sliding window
written into the file that is shorter than the sequence, so that honouring (Mistral) or ignoring
(Llama) the window is what decides the result. Keys left out of the file must take transformers'
defaults for that type.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvlab.config import HF_DEFAULTS, MistralConfig, preset
from kvlab.errors import ConfigError
from kvlab.loaders import build_model, load_model

MODEL_TYPES = sorted(HF_DEFAULTS)
SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
WINDOW = 4  # shorter than the 12-token inputs below
IDS = torch.tensor([[5, 17, 3, 90, 42, 7, 7, 1, 0, 51, 33, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def saved_by_transformers(transformers, model_type: str, directory: Path, **config_json) -> Path:
    """A tiny random ``model_type`` model saved by transformers; ``config_json`` edits the written file
    (a value of ``...`` removes the key)."""
    config = transformers.AutoConfig.for_model(model_type, **SIZES)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    data = json.loads((directory / "config.json").read_text())
    for key, value in config_json.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    (directory / "config.json").write_text(json.dumps(data))
    return directory


def hf_logits(transformers, directory: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_logits_match_transformers_with_a_window_in_the_file(tmp_path: Path, transformers, model_type: str) -> None:
    directory = saved_by_transformers(transformers, model_type, tmp_path, sliding_window=WINDOW)
    ours = load_model(directory, "inference")
    assert ours.config.sliding_window == (WINDOW if model_type == "mistral" else None)
    with torch.no_grad():
        diff = (ours(IDS) - hf_logits(transformers, directory)).abs().max().item()
    assert diff < 1e-4, diff
    # The window matters at this length (same weights, the other reading of the key), so the agreement
    # above is evidence, not luck.
    other = ours.config.replace(sliding_window=None if model_type == "mistral" else WINDOW)
    flipped = build_model(other, dict(ours.state_dict()), trainable=False)
    with torch.no_grad():
        assert (flipped(IDS) - ours(IDS)).abs().max().item() > 1e-3


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_keys_left_out_take_transformers_defaults(tmp_path: Path, transformers, model_type: str) -> None:
    optional = [key for key in HF_DEFAULTS[model_type] if key not in ("head_dim", "num_key_value_heads")]
    directory = saved_by_transformers(transformers, model_type, tmp_path, **dict.fromkeys(optional, ...))
    ours = MistralConfig.load(directory / "config.json")
    theirs = transformers.AutoConfig.from_pretrained(directory)
    for key in optional:
        if key == "rope_theta" and not hasattr(theirs, key):  # transformers >= 5 nests it
            assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
        elif key != "sliding_window":
            assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.head_dim == theirs.head_dim == SIZES["hidden_size"] // SIZES["num_attention_heads"]
    # Mistral without the key gets transformers' 4096; Llama has no window whatever the file says.
    assert ours.sliding_window == (theirs.sliding_window if model_type == "mistral" else None)
    with torch.no_grad():
        diff = (load_model(directory, "inference")(IDS) - hf_logits(transformers, directory)).abs().max().item()
    assert diff < 1e-4, diff
    # KV heads: Mistral's default is 8 whatever the query heads, Llama's one per query head.
    sizes = {k: v for k, v in SIZES.items() if k != "num_key_value_heads"}
    data = {k: v for k, v in json.loads((directory / "config.json").read_text()).items() if k != "num_key_value_heads"}
    for heads in (8, 16):
        theirs = transformers.AutoConfig.for_model(model_type, **{**sizes, "num_attention_heads": heads})
        ours = MistralConfig.from_dict({**data, "num_attention_heads": heads})
        assert ours.num_key_value_heads == theirs.num_key_value_heads, heads


def test_llama_config_never_gets_a_window() -> None:
    base = {**preset("tiny").to_dict(), "model_type": "llama"}
    for window in (None, 4096, 3):
        assert MistralConfig.from_dict({**base, "sliding_window": window}).sliding_window is None
    assert MistralConfig.from_dict({k: v for k, v in base.items() if k != "sliding_window"}).sliding_window is None
    mistral = {k: v for k, v in preset("tiny").to_dict().items() if k != "sliding_window"}
    assert MistralConfig.from_dict(mistral).sliding_window == 4096
    assert MistralConfig.from_dict({**mistral, "sliding_window": None}).sliding_window is None


def test_null_kv_heads_means_one_per_query_head() -> None:
    data = preset("tiny").to_dict()
    for model_type in MODEL_TYPES:
        config = MistralConfig.from_dict({**data, "model_type": model_type, "num_key_value_heads": None})
        assert config.num_key_value_heads == config.num_attention_heads


@pytest.mark.parametrize("change, fragment", [
    ({"model_type": "qwen2"}, "model_type"),
    ({"model_type": ["llama"]}, "model_type"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
])
def test_what_kvlab_does_not_implement_is_refused(change: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        MistralConfig.from_dict({**preset("tiny").to_dict(), "model_type": "llama", **change})
