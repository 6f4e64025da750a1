"""The decode-leak check: fails on trainable weights, passes on the fixes, works on a foreign model."""

from __future__ import annotations

import gc
import importlib.util
import threading
from pathlib import Path

import pytest
import torch

from kvlab.caches import ConcatCache, make_cache
from kvlab.checkpoint import build_checkpoint, random_state_dict
from kvlab.config import preset
from kvlab.generate import generate
from kvlab.memory.leakguard import DecodeLeakError, check_decode_leak, kv_bytes_per_token, measure_retained
from kvlab.loaders import build_model, load_model
from kvlab.memory.trace import MemoryTracer


STEPS = 8
PROMPT = torch.tensor([[1]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint("tiny", root=tmp_path_factory.mktemp("ckpt"))


def decode(model: torch.nn.Module, kind: str = "concat", **kwargs: object):
    config = model.config
    return lambda n: generate(model, PROMPT, n, cache=make_cache(kind, config, max_tokens=n + 1), **kwargs)


def test_trainable_loader_fails_with_the_cause(checkpoint: Path, leak_guard) -> None:
    model = load_model(checkpoint, "trainable")
    with pytest.raises(DecodeLeakError) as info:
        leak_guard(decode(model), STEPS)
    message, report = str(info.value), info.value.report
    assert "parameters that require grad" in message and "model.layers.0.self_attn.q_proj.weight" in message
    # The prefill stores K/V as they are; each of the 2N - 1 decode steps concatenates onto the last.
    assert f"chained across {2 * STEPS - 1} steps" in message
    assert report.at_2n.graph_cache_tensors == report.at_2n.cache_tensors == 2 * model.config.num_hidden_layers
    # Growth is far beyond the cache's and superlinear: the saved tensors of a step grow with the cache.
    assert report.growth > 10 * report.expected_growth
    assert report.growth_ratio > 2.2
    if importlib.util.find_spec("kvlab.memory.retention") is not None:
        assert "retention explainer" in message


@pytest.mark.parametrize("loader", ["inference", "int8"])
def test_fixed_loaders_pass(checkpoint: Path, loader: str, leak_guard) -> None:
    model = load_model(checkpoint, loader)
    report = leak_guard(decode(model), STEPS)
    assert not report.leak and report.verdict == "ok"
    assert not report.at_2n.has_graph and report.at_2n.saved_tensors == 0
    # The cache holds exactly the analytic K/V bytes: prompt + (2N - 1) decoded positions.
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
    with pytest.raises(DecodeLeakError, match="carry an autograd graph"):
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


def test_transformers_model_hand_written_loop(leak_guard, hf_mistral) -> None:
    transformers = pytest.importorskip("transformers")
    model = hf_mistral(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    config = model.config

    def loop(n: int):
        cache = transformers.DynamicCache(config=config)
        ids = torch.tensor([[1]])
        for _ in range(n):
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits
            ids = logits[:, -1:].argmax(-1)
        return cache

    with pytest.raises(DecodeLeakError) as info:
        leak_guard(loop, STEPS)
    assert "model.layers.0.self_attn.q_proj.weight" in str(info.value)
    assert info.value.report.kv_per_token == 2 * 2 * 2 * 16 * 4  # from the closed-over model's config

    def no_grad_loop(n: int):
        with torch.no_grad():
            return loop(n)

    assert not leak_guard(no_grad_loop, STEPS).leak
    model.requires_grad_(False)
    assert not leak_guard(loop, STEPS).leak


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


def test_report_without_raising(leak_guard) -> None:
    config = preset("tiny")
    model = build_model(config, random_state_dict(config), trainable=True)
    report = leak_guard(decode(model), 4, raise_on_leak=False)
    assert report.leak and report.as_row()["verdict"] == "LEAK"
    assert leak_guard.reports == [report]
