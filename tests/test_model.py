"""The model computes what a Mistral decoder computes, with or without a cache."""

import pytest
import torch

from kvlab.caches import ConcatCache
from kvlab.config import preset
from kvlab.generate import generate
from kvlab.loaders import build_model
from kvlab.model import region, repeat_kv
from kvlab.synthetic import random_state_dict


def frozen_model(**overrides):
    config = preset("tiny", **overrides)
    return build_model(config, random_state_dict(config, seed=0), trainable=False)


@pytest.mark.parametrize("n_rep", [1, 2, 4])
@pytest.mark.parametrize("kv_heads", [1, 3])
def test_repeat_kv_equals_repeat_interleave(n_rep: int, kv_heads: int) -> None:
    x = torch.randn(2, kv_heads, 5, 8)
    out = repeat_kv(x, n_rep)
    assert torch.equal(out, torch.repeat_interleave(x, n_rep, dim=1))
    # What its docstring promises about memory: a copy only with several KV heads and n_rep > 1.
    shares = out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert shares == (n_rep == 1 or kv_heads == 1)
    assert (out is x) == (n_rep == 1)


@pytest.mark.parametrize("batch", [1, 2])
def test_cached_tokens_equal_uncached(batch: int) -> None:
    model = frozen_model()
    prompt = torch.arange(1, 1 + 4 * batch).view(batch, 4)
    cached = generate(model, prompt, 160, cache=ConcatCache(model.config.num_hidden_layers)).tokens
    uncached = generate(model, prompt, 160, cache=None).tokens
    assert torch.equal(cached, uncached)
    # Random weights that always pick one token would make this check vacuous.
    assert cached[:, 4:].unique().numel() > 20


def test_sliding_window_changes_the_result_and_cache_still_matches() -> None:
    full, windowed = frozen_model(), frozen_model(sliding_window=8)
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])
    w_cached = generate(windowed, prompt, 40, cache=ConcatCache(4)).tokens
    assert torch.equal(w_cached, generate(windowed, prompt, 40).tokens)
    assert not torch.equal(w_cached, generate(full, prompt, 40).tokens)


def test_tied_embeddings_share_one_tensor() -> None:
    model = frozen_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_logits_match_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    config = preset("tiny", sliding_window=6)
    state = random_state_dict(config, seed=1)
    ours = build_model(config, state, trainable=False)
    hf_config = transformers.MistralConfig(**{k: v for k, v in config.to_dict().items() if k != "torch_dtype"},
                                           attn_implementation="eager")
    theirs = transformers.MistralForCausalLM(hf_config).eval()
    theirs.load_state_dict(state)
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 7, 1, 0, 512, 33, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_regions_are_opened_only_while_observed() -> None:
    """A dispatch mode (kvlab's memory tools) and the profiler see every region; unobserved, none is
    opened (they would cost about a third of a tiny decode step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model, ids = frozen_model(), torch.tensor([[3, 1, 4, 1]])
    names: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith("profiler._record_function_enter_new"):
                names.append(args[0])
            return func(*args, **(kwargs or {}))

    assert region("mlp") is region("attention")  # the shared no-op
    with torch.no_grad(), Record():
        model(ids, cache=ConcatCache(model.config.num_hidden_layers))
    layers = model.config.num_hidden_layers
    assert sorted(set(names)) == ["attention", "cache", "embed", "lm_head", "mlp", "norm", "repeat_kv"]
    assert names.count("repeat_kv") == names.count("cache") == layers and names.count("norm") == 2 * layers + 1
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(ids)
    assert {"attention", "mlp", "repeat_kv", "lm_head"} <= {event.key for event in prof.key_averages()}
