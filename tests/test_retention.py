"""The retention explainer names the cause of a leak on loops kvlab did not write, and finds nothing when
there is none; tagging saved tensors changes nothing it measures."""

from __future__ import annotations

import contextlib
import ctypes
import gc

import foreign_models as fm
import pytest
import torch
from torch import nn

from kvlab.caches import ConcatCache
from kvlab.generate import generate
from kvlab.loaders import random_model
from kvlab.memory.graph import collect_tensors
from kvlab.memory.retention import SavedTensorTags, explain, tag_saved_tensors
from kvlab.memory.rss import rss_bytes
from kvlab.memory.trace import MemoryTracer, TracerError

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
    assert set(report.leaves["kind"]) == {"parameter"}
    # kvlab's cache stores the prefill's K/V as they are and concatenates onto them 63 times
    assert report.cat_chain == TOKENS - 1 and report.state_chain == TOKENS
    assert report.steps_chained == report.forward_passes == report.tagged_steps == TOKENS
    assert report.by_site()["site"].iloc[0] == "repeat_kv"
    assert report.by_op()["op"].iloc[0] == "BmmBackward0"
    summary = report.summary()
    assert f"{n_params} of {n_params} parameters require grad" in summary
    assert f"spans {TOKENS} decode steps" in summary and "repeat_kv" in summary
    assert "load the weights frozen" in summary and "inference_mode" in summary
    # saved tensors de-duplicated by storage, parameters excluded
    assert report.saved["ptr"].is_unique
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not set(report.saved["ptr"]) & param_ptrs
    assert report.graph_nodes > TOKENS * 4 * 20


def test_static_walk_works_without_tags(kvlab_leak) -> None:
    model, gen, tags = kvlab_leak
    plain = explain(gen, model=model)  # a whole result object as the root
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


# --------------------------------------------------------------------------------------------- tagging
def _trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so RSS shows what is really still in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pytest.skip("needs glibc's malloc_trim to read freed memory from RSS")


def _run_and_free(model: nn.Module, tag: bool) -> dict[str, int]:
    """Decode with or without tagging; bytes alive at the end (tracer), and what is left after
    everything is deleted (tracer and RSS above the start)."""
    _trim()
    start = rss_bytes()
    with MemoryTracer() as tracer:
        with tag_saved_tensors() if tag else contextlib.nullcontext() as tags:
            gen = generate(model, torch.ones(16, 1, dtype=torch.long), 32, cache=ConcatCache(4),
                           on_step=tags.mark_step if tag else None)
        kept = tracer.live_bytes
        del gen, tags
        gc.collect()
        left = tracer.live_bytes
    _trim()
    return {"kept": kept, "left": left, "rss_left": rss_bytes() - start}


def test_tagging_changes_nothing_it_measures() -> None:
    """Tagging must not keep what the loop let go: its pack hook once returned the saved tensor itself,
    and outputs saved by their own node then formed reference cycles the collector could not free."""
    model = random_model("tiny", "trainable")
    _run_and_free(model, tag=False)  # warm-up: allocator arenas and thread pools are paid once
    plain, tagged = _run_and_free(model, tag=False), _run_and_free(model, tag=True)
    assert plain["kept"] > 50 << 20  # the leak under test: all 32 steps' saved tensors, batch 16
    assert tagged["kept"] == plain["kept"]
    assert tagged["left"] == plain["left"] == 0
    assert abs(tagged["rss_left"] - plain["rss_left"]) < 0.1 * plain["kept"], (tagged, plain)


def test_tagging_restores_hooks_and_modes_on_error() -> None:
    hooks_before = torch._C._autograd._top_saved_tensors_default_hooks(False)
    modes_before = torch._C._len_torch_dispatch_stack()
    grad = torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with tag_saved_tensors():
            assert torch._C._len_torch_dispatch_stack() == modes_before + 1
            raise RuntimeError("boom")
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) == hooks_before
    assert torch._C._len_torch_dispatch_stack() == modes_before
    assert SavedTensorTags._active is None and torch.is_grad_enabled() == grad


def test_tagging_cannot_nest() -> None:
    with tag_saved_tensors():
        with pytest.raises(TracerError):
            with tag_saved_tensors():
                pass
    assert SavedTensorTags._active is None


# --------------------------------------------------------------------------------------------- foreign loops
def test_rnn_loop_spans_every_step() -> None:
    """No KV cache and no cat: the hidden state chains all 32 steps, read from how often each weight is used."""
    model = fm.TinyRNN()
    hidden, logits = fm.rnn_decode(model, 32)
    report = explain(hidden, logits, model=model)
    assert report.steps_chained == report.forward_passes == 32 and report.cat_chain == 0
    assert "spans 32 decode steps" in report.summary()
    assert "load the weights frozen" in report.summary() and "detaching the cache" not in report.summary()
    assert explain(*fm.rnn_decode(model, 32, grad=False), model=model).summary().startswith("Nothing retained")


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("arch", ["mistral", "llama", "gpt2", "qwen2"])
def test_transformers_loop_counts_its_forward_passes(arch: str) -> None:
    """33 forward passes are 33 steps: transformers' cache concatenates its first K/V onto an empty
    tensor, so its chain has as many links as passes (one more than kvlab's)."""
    model = fm.hf_model(arch)
    with tag_saved_tensors() as tags:
        cache, logits = fm.hf_decode(model, 33, on_step=tags.mark_step)
    report = explain(cache, logits, model=model, tags=tags)
    untagged = explain(cache, logits, model=model)
    assert report.tagged_steps == untagged.steps_chained == untagged.state_chain == 33
    n_params = len(list(model.parameters()))
    assert f"{n_params} of {n_params} parameters require grad" in report.summary()
    assert "spans 33 decode steps" in report.summary() and f"{arch}/modeling_{arch}.py" in report.summary()
    cache, logits = fm.hf_decode(model, 8, grad=False)
    assert explain(cache, logits, model=model).summary().startswith("Nothing retained")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_advice_follows_a_trainable_input() -> None:
    """A frozen model fed one trainable input (a soft prompt): the input is the cause, not the loader."""
    model = fm.hf_model("llama").requires_grad_(False)
    soft_prompt = nn.Parameter(torch.randn(1, 4, model.config.hidden_size))
    cache, logits = fm.hf_decode(model, 8, inputs_embeds=soft_prompt)
    report = explain(cache, logits, model=model)
    assert report.leaves[["kind", "shape"]].values.tolist() == [["input", (1, 4, model.config.hidden_size)]]
    assert report.parameters_requiring_grad == [] and report.steps_chained == 8
    summary = report.summary()
    assert "1 input tensor(s) that are not parameters of the model require grad" in summary
    assert "detach those inputs" in summary and "load the weights frozen" not in summary


@pytest.mark.parametrize("store", fm.STORES)
def test_any_container_is_walked(store: str) -> None:
    model = fm.TinyLM()
    cache, tokens = fm.decode(model, 6, store=store, batch=2)
    report = explain(cache, tokens, model=model)
    assert report.steps_chained == report.state_chain == 6
    assert report.roots == 2 * model.layers + 1


def test_collect_tensors_finds_tensors_in_objects() -> None:
    class Holder:
        def __init__(self) -> None:
            self.layers = [{"k": torch.ones(2)}, (torch.zeros(3),)]
            self.model = nn.Linear(2, 2)  # modules are not searched

    class Slotted:
        __slots__ = ("k",)

        def __init__(self) -> None:
            self.k = torch.ones(4)

    found = collect_tensors(Holder(), torch.ones(1), None, "text", Slotted())
    assert sorted(t.numel() for t in found) == [1, 2, 3, 4]
