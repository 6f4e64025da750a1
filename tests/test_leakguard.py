"""The decode-leak check: a verdict read from the tensors, on kvlab's loops and on loops it did not write.

It fails on whatever a loop keeps beyond its own state -- a linear leak, a quadratic one, a leak into a
list of returned logits -- and passes on legitimate caches of any class name, container and batch size.
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import foreign_models as fm
import pytest
import torch

from kvlab.caches import ConcatCache, make_cache
from kvlab.config import preset
from kvlab.generate import generate
from kvlab.loaders import build_model, load_model
from kvlab.memory.leakguard import DecodeLeakError, check_decode_leak, kv_bytes_per_token, measure_retained
from kvlab.memory.trace import MemoryTracer
from kvlab.synthetic import build_checkpoint, random_state_dict

STEPS = 8
PROMPT = torch.tensor([[1]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint("tiny", root=tmp_path_factory.mktemp("ckpt"))


def decode(model: torch.nn.Module, kind: str = "concat", **kwargs: object):
    config = model.config
    return lambda n: generate(model, PROMPT, n, cache=make_cache(kind, config, max_tokens=n + 1), **kwargs)


# --------------------------------------------------------------------------------------------- kvlab's loop
def test_trainable_loader_fails_with_the_cause(checkpoint: Path, leak_guard) -> None:
    model = load_model(checkpoint, "trainable")
    with pytest.raises(DecodeLeakError) as info:
        leak_guard(decode(model), STEPS)
    message, report = str(info.value), info.value.report
    assert "parameters that require grad" in message and "model.layers.0.self_attn.q_proj.weight" in message
    # The prefill stores K/V as they are; each of the 2N - 1 decode steps concatenates onto the last.
    assert f"chained across {2 * STEPS} steps by their updates" in message
    assert report.at_2n.graph_cache_tensors == report.at_2n.cache_tensors == 2 * model.config.num_hidden_layers
    assert report.at_2n.saved_bytes > 10 * report.at_2n.cache_bytes and report.growth_ratio > 2.2
    assert "load the weights frozen" in message and "\n\nretention explainer:\n" in message


@pytest.mark.parametrize("loader", ["inference", "int8"])
def test_fixed_loaders_pass(checkpoint: Path, loader: str, leak_guard) -> None:
    model = load_model(checkpoint, loader)
    report = leak_guard(decode(model), STEPS)
    assert not report.leak and report.verdict == "ok"
    assert not report.at_2n.has_graph and report.at_2n.saved_tensors == 0
    # The K/V-shaped state is exactly the analytic K/V bytes: prompt + (2N - 1) decoded positions.
    per_token = kv_bytes_per_token(model.config)
    assert report.kv_per_token == per_token
    assert report.at_2n.cache_bytes == per_token * 2 * STEPS
    assert report.growth - report.expected_growth < 1024  # positions bookkeeping and one token id per step


def test_inference_mode_fixes_a_trainable_model(leak_guard) -> None:
    config = preset("tiny")
    model = build_model(config, random_state_dict(config), trainable=True)
    assert not leak_guard(decode(model, inference_mode=True), STEPS).leak


@pytest.mark.parametrize("kind", ["static", "paged"])
def test_in_place_caches_leak_too(kind: str, leak_guard) -> None:
    config = preset("tiny")
    trainable = build_model(config, random_state_dict(config), trainable=True)
    with pytest.raises(DecodeLeakError, match="K/V-shaped state tensors carry the graph"):
        leak_guard(decode(trainable, kind), STEPS)
    frozen = build_model(config, random_state_dict(config), trainable=False)
    assert not leak_guard(decode(frozen, kind), STEPS).leak


def test_retained_bytes_agree_with_the_exact_tracer() -> None:
    """Two independent exact measures: the graph walk from what the loop keeps, and every storage
    allocated during the run that is still alive."""
    config = preset("tiny")
    model = build_model(config, random_state_dict(config), trainable=True)
    with MemoryTracer() as tracer:
        kept = generate(model, PROMPT, 12, cache=ConcatCache(config.num_hidden_layers))
        gc.collect()
        live = tracer.live_bytes
    retained = measure_retained(kept, model)
    assert retained.saved_bytes > 10 * retained.cache_bytes
    assert abs(retained.total_bytes - live) <= 0.001 * live + 1024


# --------------------------------------------------------------------------------------------- foreign loops
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("store", fm.STORES)
def test_legitimate_caches_pass_whatever_they_are_called(store: str, batch: int, leak_guard) -> None:
    """no_grad loops with caches in a dict, a list, a tuple or an object of any class name: the K/V
    are found by shape and the verdict is ok at every batch size, with a message that says so."""
    model = fm.TinyLM()
    report = leak_guard(lambda n: fm.decode(model, n, store=store, batch=batch, grad=False, capacity=64), STEPS)
    assert report.verdict == "ok" and report.at_2n.saved_bytes == 0
    assert report.at_2n.cache_tensors == 2 * model.layers
    kv = 2 * model.layers * model.kv_heads * model.head_dim * batch * 4  # bytes per cached position
    assert report.at_2n.cache_bytes == kv * (64 if store == "ledger" else 2 * STEPS)
    assert report.at_2n.other_bytes == batch * (1 + 2 * STEPS) * 8  # the tokens
    assert "no cache" not in report.explanation and report.explanation.startswith("ok:")


def test_a_linear_leak_is_a_leak() -> None:
    """A preallocated cache written in place under grad: each step records a graph of constant size, so
    the leak grows linearly -- the same law as a cache -- by about 16 KiB a step at batch 1."""
    model = fm.TinyLM()
    report = check_decode_leak(lambda n: fm.decode(model, n, store="ledger", capacity=32), 4, raise_on_leak=False)
    assert report.leak and report.at_2n.cache_bytes == report.at_n.cache_bytes  # the cache itself never grows
    saved_n, saved_2n = report.at_n.saved_bytes, report.at_2n.saved_bytes
    assert saved_2n == 2 * saved_n and saved_2n - saved_n < 64 << 10  # exactly linear, and small
    assert report.at_2n.graph_cache_tensors == 2 * model.layers and report.at_2n.chained_steps == 8
    assert "chained across 8 steps by their updates" in report.explanation


@pytest.mark.parametrize("store", ["dict", "tuple"])
def test_a_quadratic_leak_is_a_leak(store: str) -> None:
    model = fm.TinyLM()
    with pytest.raises(DecodeLeakError) as info:
        check_decode_leak(lambda n: fm.decode(model, n, store=store), STEPS)
    report = info.value.report
    assert report.at_2n.forward_passes == report.at_2n.chained_steps == 2 * STEPS
    assert "blocks.0.q.weight" in str(info.value) and "load the weights frozen" in str(info.value)


def test_a_leak_into_returned_logits_is_a_leak() -> None:
    """The cache detaches what it stores (Candle's defensive fix), so it carries no graph; the loop
    keeps every step's logits, and each holds its whole step's graph."""
    model = fm.TinyLM()
    report = check_decode_leak(lambda n: fm.decode(model, n, detach=True, keep_logits=True), STEPS,
                               raise_on_leak=False)
    assert report.leak and report.at_2n.graph_cache_tensors == 0 and report.at_2n.chained_steps == 0
    assert report.at_2n.forward_passes == 2 * STEPS and report.at_2n.saved_bytes > report.at_2n.state_bytes
    assert "detaching the cache" not in report.explanation  # it is detached: the advice must not say so


def test_state_that_grows_faster_than_a_cache_is_a_leak() -> None:
    """No graph at all, but a snapshot of the whole sequence kept at every step: quadratic state."""
    model = fm.TinyLM()
    report = check_decode_leak(lambda n: fm.decode(model, n, grad=False, keep_history=True), STEPS,
                               raise_on_leak=False)
    assert report.leak and not report.at_2n.has_graph
    assert report.at_2n.state_bytes > 2 * report.at_n.state_bytes
    assert "more than doubled" in report.explanation


def test_large_scratch_buffers_are_not_kept(leak_guard) -> None:
    model = fm.TinyLM()
    report = leak_guard(lambda n: fm.decode(model, n, grad=False, scratch_bytes=32 << 20), 4)
    assert report.at_2n.total_bytes < 8 << 10


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("arch", ["mistral", "llama", "gpt2"])
def test_transformers_models(arch: str, leak_guard) -> None:
    model = fm.hf_model(arch)
    with pytest.raises(DecodeLeakError) as info:
        leak_guard(lambda n: fm.hf_decode(model, n, batch=2), STEPS)
    weight = next(name for name, p in model.named_parameters() if ".0." in name)
    assert weight in str(info.value)
    report = leak_guard(lambda n: fm.hf_decode(model, n, batch=2, grad=False), STEPS)
    per_token = kv_bytes_per_token(model.config, batch=2)  # from the closed-over model's config
    assert report.kv_per_token == per_token and report.at_2n.cache_bytes == per_token * 2 * STEPS
    model.requires_grad_(False)
    assert not leak_guard(lambda n: fm.hf_decode(model, n), STEPS).leak


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_trainable_input_is_named_as_the_cause() -> None:
    model = fm.hf_model("qwen2").requires_grad_(False)
    soft_prompt = torch.nn.Parameter(torch.randn(1, 3, model.config.hidden_size))
    with pytest.raises(DecodeLeakError) as info:
        check_decode_leak(lambda n: fm.hf_decode(model, n, inputs_embeds=soft_prompt), 4)
    message = str(info.value).split("\n\nretention explainer:")[0]
    assert "the graph reaches 1 input tensors that require grad: <tensor (1, 3, 64) float32>" in message
    assert "parameters that require grad" not in message
    assert "detach those inputs" in message and "load the weights frozen" not in message


# --------------------------------------------------------------------------------------------- arguments, state
def test_state_is_restored_when_the_loop_raises() -> None:
    threads = threading.active_count()

    def broken(n: int):
        torch.set_grad_enabled(False)
        raise RuntimeError("decode failed half way")

    assert torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="half way"):
        check_decode_leak(broken, 4)
    assert torch.is_grad_enabled()
    assert threading.active_count() == threads


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        check_decode_leak(lambda n: None, 0)
    with pytest.raises(TypeError):
        check_decode_leak("not callable", 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kv_per_token"):  # a config given explicitly must make sense
        check_decode_leak(lambda n: torch.ones(n), 2, config=object())


def test_report_without_raising(leak_guard) -> None:
    config = preset("tiny")
    model = build_model(config, random_state_dict(config), trainable=True)
    report = leak_guard(decode(model), 4, raise_on_leak=False)
    assert report.leak and report.as_row()["verdict"] == "LEAK"
    assert leak_guard.reports == [report]
