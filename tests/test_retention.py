"""The retention explainer names the cause of the leak, and finds nothing when there is none."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kvlab.caches import ConcatCache
from kvlab.generate import generate
from kvlab.loaders import random_model
from kvlab.memory.trace import MemoryTracer, TracerError
from kvlab.memory.retention import SavedTensorTags, collect_tensors, explain, tag_saved_tensors
from kvlab.memory.regions import _listeners

TOKENS = 64


@pytest.fixture(scope="module")
def kvlab_leak():
    model = random_model("tiny", "trainable")
    with tag_saved_tensors() as tags:
        gen = generate(model, torch.tensor([[1]]), TOKENS, cache=ConcatCache(4), on_step=tags.mark_step)
    return model, gen, tags


def test_kvlab_trainable_names_the_cause(kvlab_leak) -> None:
    model, gen, tags = kvlab_leak
    report = explain(gen.cache, gen.logits, model=model, tags=tags)
    n_params = len(list(model.parameters()))
    assert report.parameters_requiring_grad == [name for name, _ in model.named_parameters()]
    assert set(report.leaves["name"]) <= set(report.parameters_requiring_grad)
    assert report.cat_chain == TOKENS - 1 and report.steps_chained == TOKENS == report.tagged_steps
    assert report.by_site()["site"].iloc[0] == "repeat_kv"
    assert report.by_op()["op"].iloc[0] == "BmmBackward0"
    summary = report.summary()
    assert f"{n_params} of {n_params} parameters require grad" in summary
    assert f"chains {TOKENS} decode steps" in summary and "repeat_kv" in summary and "inference" in summary
    # saved tensors de-duplicated by storage, parameters excluded
    assert report.saved["ptr"].is_unique
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not set(report.saved["ptr"]) & param_ptrs
    assert report.graph_nodes > TOKENS * 4 * 20


def test_static_walk_works_without_tags(kvlab_leak) -> None:
    model, gen, tags = kvlab_leak
    plain = explain(gen, model=model)  # a whole Generation as the root
    tagged = explain(gen.cache, gen.logits, model=model, tags=tags)
    assert plain.saved_bytes == tagged.saved_bytes and plain.graph_nodes == tagged.graph_nodes
    assert plain.steps_chained == TOKENS and plain.site_source == "none"
    assert "By site" not in plain.summary() and "BmmBackward0" in plain.summary()


def test_tracer_sites_and_step_tags_agree() -> None:
    model = random_model("tiny", "trainable")
    with MemoryTracer() as tracer:
        gen = generate(model, torch.tensor([[1]]), 24, cache=ConcatCache(4), on_step=tracer.mark_step)
    report = explain(gen.cache, gen.logits, model=model, tracer=tracer)
    by_site = report.by_site().set_index("site")["bytes"]
    alive = tracer.by_site().set_index("site")["alive_end_bytes"]
    assert by_site["repeat_kv"] == alive["repeat_kv"]
    steps = report.by_step()["step"].dropna()  # the 0-dim score scales never pass through the dispatcher
    assert list(steps) == list(range(24))


@pytest.mark.parametrize("how", ["frozen weights", "no_grad", "inference_mode"])
def test_fixed_loops_retain_nothing(how: str) -> None:
    model = random_model("tiny", "inference" if how == "frozen weights" else "trainable")
    prompt = torch.tensor([[1]])
    with torch.no_grad() if how == "no_grad" else torch.enable_grad():
        gen = generate(model, prompt, 16, cache=ConcatCache(4), inference_mode=how == "inference_mode")
    report = explain(gen, model=model)
    assert not report.retains and report.saved_bytes == 0 and report.graph_nodes == 0
    assert report.summary().startswith("Nothing retained")


# --------------------------------------------------------------------------------------------- transformers
def hf_loop(model, steps: int, on_step=lambda i: None):
    """A hand-written greedy loop over transformers' model with a DynamicCache, grad left as it is."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([[1]])
    logits = None
    for step in range(steps):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        ids = logits.argmax(-1, keepdim=True)
        on_step(step)
    return cache, logits


@pytest.fixture(scope="module")
def hf_model(hf_mistral):
    return hf_mistral(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_transformers_hand_written_loop_names_the_cause(hf_model) -> None:
    with tag_saved_tensors() as tags:
        cache, logits = hf_loop(hf_model, 32, tags.mark_step)
    report = explain(cache, logits, model=hf_model, tags=tags)
    n_params = len(list(hf_model.parameters()))
    assert len(report.parameters_requiring_grad) == n_params
    assert report.steps_chained == 32 and report.cat_chain >= 31
    assert report.saved_bytes > 1 << 20
    summary = report.summary()
    assert f"{n_params} of {n_params} parameters require grad" in summary
    assert "modeling_mistral.py" in summary  # sites are the model's source lines
    with torch.no_grad():
        cache, logits = hf_loop(hf_model, 8)
    assert explain(cache, logits, model=hf_model).summary().startswith("Nothing retained")


# --------------------------------------------------------------------------------------------- state
def test_tagging_restores_hooks_and_listeners_on_error() -> None:
    hooks_before = torch._C._autograd._top_saved_tensors_default_hooks(False)
    listeners = list(_listeners)
    grad = torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with tag_saved_tensors():
            assert len(_listeners) == len(listeners) + 1
            raise RuntimeError("boom")
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) == hooks_before
    assert _listeners == listeners and SavedTensorTags._active is None and torch.is_grad_enabled() == grad


def test_tagging_cannot_nest() -> None:
    with tag_saved_tensors():
        with pytest.raises(TracerError):
            with tag_saved_tensors():
                pass
    assert SavedTensorTags._active is None


def test_collect_tensors_finds_tensors_in_objects() -> None:
    class Holder:
        def __init__(self) -> None:
            self.layers = [{"k": torch.ones(2)}, (torch.zeros(3),)]
            self.model = nn.Linear(2, 2)  # modules are not searched

    found = collect_tensors(Holder(), torch.ones(1), None, "text")
    assert sorted(t.numel() for t in found) == [1, 2, 3]
