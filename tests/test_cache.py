"""KV-cache variants: same tokens as no cache, exact sizes, overflow, ragged batches, and the leak.

Models have seeded random weights (linears N(0, fan_in^-0.5), embeddings N(0, 1)): that scale gives
logits of order one, so greedy decoding wanders over many tokens and near-ties are rare, which makes
"identical tokens" a sharp check. Reference runs without a cache are cached per module, since they
recompute the whole sequence every step. (conftest runs each module on one intra-op thread.)
"""

from __future__ import annotations

import functools
import math
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvlab.caches import CACHES, EXACT_CACHES, KVCache, kv_bytes, make_cache
from kvlab.config import MistralConfig, preset
from kvlab.errors import CacheOverflowError
from kvlab.generate import generate, generate_ragged
from kvlab.loaders import random_model
from kvlab.model import MistralForCausalLM

PROMPT_LEN = 8


# ------------------------------------------------------------------------------------------ helpers
@functools.cache
def frozen(config: MistralConfig, seed: int = 0) -> MistralForCausalLM:
    return random_model(config, "inference", seed)


def prompt_for(config: MistralConfig, batch: int, length: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def cache_for(kind: str, config: MistralConfig, batch: int, tokens: int, **options) -> KVCache:
    return make_cache(kind, config, batch, max_tokens=tokens, **options)


@functools.cache
def reference(config: MistralConfig, batch: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """No-cache greedy tokens (B, T+steps) and the logits of every step (steps, B, V)."""
    logits = []
    out = generate(frozen(config), prompt_for(config, batch), steps, cache=None, inference_mode=True,
                   on_step=lambda s: logits.append(s.logits.clone()))
    return out.tokens, torch.stack(logits)


def kinds_for(config: MistralConfig, kinds=EXACT_CACHES) -> list[str]:
    return [k for k in kinds if k != "sliding" or config.sliding_window is not None]


# ------------------------------------------------------------------------------------------ exactness
TWO_LAYERS = preset("tiny", num_hidden_layers=2)
WINDOWED = preset("tiny", num_hidden_layers=2, sliding_window=48)
CASES = {  # name: (config, batch, steps)
    "full-b1": (TWO_LAYERS, 1, 256),
    "full-b2": (TWO_LAYERS, 2, 256),
    "window48-b1": (WINDOWED, 1, 256),
    "window48-b2": (WINDOWED, 2, 160),
}


@pytest.mark.parametrize(("case", "kind"), [(case, kind) for case, (config, _, _) in CASES.items()
                                            for kind in kinds_for(config)])
def test_exact_variants_give_the_no_cache_tokens(case: str, kind: str) -> None:
    config, batch, steps = CASES[case]
    expected, _ = reference(config, batch, steps)
    cache = cache_for(kind, config, batch, PROMPT_LEN + steps)
    tokens = generate(frozen(config), prompt_for(config, batch), steps, cache=cache, inference_mode=True).tokens
    assert torch.equal(tokens, expected)
    assert expected[:, PROMPT_LEN:].unique().numel() > 30  # not a degenerate repeat of one token
    assert cache.seq_len == PROMPT_LEN + steps - 1  # the last chosen token is never fed back


def test_the_window_is_shorter_than_the_sequence_and_matters() -> None:
    assert WINDOWED.sliding_window < PROMPT_LEN + CASES["window48-b1"][2]
    assert not torch.equal(reference(WINDOWED, 1, 256)[0], reference(TWO_LAYERS, 1, 256)[0])


def test_int8_is_close_but_not_exact(capsys: pytest.CaptureFixture[str]) -> None:
    """Teacher-forced on the no-cache tokens, so each step's logits are compared on the same input."""
    config, batch, steps = CASES["full-b1"]
    expected, ref_logits = reference(config, batch, steps)
    model, cache = frozen(config), make_cache("int8", config, batch)
    logits = []
    with torch.inference_mode():
        logits.append(model(expected[:, :PROMPT_LEN], cache=cache, last_only=True)[:, -1])
        for i in range(PROMPT_LEN, PROMPT_LEN + steps - 1):
            logits.append(model(expected[:, i:i + 1], cache=cache, last_only=True)[:, -1])
    logits = torch.stack(logits)  # (steps, B, V)
    agreement = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    max_error = (logits - ref_logits).abs().max().item()
    free = generate(model, prompt_for(config, batch), steps, cache=make_cache("int8", config, batch),
                    inference_mode=True).tokens[0, PROMPT_LEN:]
    mismatch = (free != expected[0, PROMPT_LEN:]).nonzero()
    first_divergence = mismatch[0].item() if len(mismatch) else steps
    with capsys.disabled():
        print(f"\n[int8 cache, {steps} steps] teacher-forced argmax agreement {agreement:.4f}, max |logit error| "
              f"{max_error:.4f} (logit std {ref_logits.std().item():.2f}); free-running: first divergence at "
              f"step {first_divergence}")
    assert agreement >= 0.98
    assert 0 < max_error < 0.1
    assert first_divergence >= 32


@pytest.mark.parametrize("window", [1, 4])
def test_sliding_prefill_longer_than_the_window(window: int) -> None:
    """The prompt's own queries need in-flight keys the ring cannot hold: the prefill returns them all."""
    config = preset("tiny", num_hidden_layers=2, sliding_window=window)
    model, prompt = frozen(config), prompt_for(config, 2, length=11)
    cache = make_cache("sliding", config, 2)
    tokens = generate(model, prompt, 12, cache=cache, inference_mode=True).tokens
    assert torch.equal(tokens, generate(model, prompt, 12, cache=None, inference_mode=True).tokens)
    assert cache.nbytes == kv_bytes(config, 2, 22, kind="sliding")  # the ring, never more


def test_registry_is_derived_from_the_designs() -> None:
    assert all(cls.kind == kind for kind, cls in CACHES.items())
    assert EXACT_CACHES == tuple(kind for kind in CACHES if kind != "int8")
    assert {kind for kind, cls in CACHES.items() if cls.ragged} == {"static", "gqa", "sliding", "paged"}
    assert [kind for kind, cls in CACHES.items() if cls.grouped] == ["gqa"]


def allocated_shapes(run) -> list[tuple[int, ...]]:
    """Shapes of the tensors ops return in new storage (not views of their inputs) while ``run()`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    shapes.append(tuple(t.shape))
            return out

    with Record():
        run()
    return shapes


@pytest.mark.parametrize("kind", ["gqa", "static"])
def test_grouped_attention_never_builds_repeat_kv_copies(kind: str) -> None:
    """A decode step with ``gqa`` allocates nothing of the size of one repeat_kv copy (B, H, S, D);
    ``static`` (explicit repeat_kv) is the control that shows the check can fail."""
    config = TWO_LAYERS
    model, prompt = frozen(config), prompt_for(config, 1, length=64)
    cache = cache_for(kind, config, 1, 64 + 4, trim=True)
    with torch.inference_mode():
        model(prompt, cache=cache)
        shapes = allocated_shapes(lambda: model(prompt[:, :1], cache=cache, last_only=True))
    copy = (1, config.num_attention_heads, 65, config.head_dim)  # H heads x the 65 positions now cached
    as_large = [s for s in shapes if math.prod(s) >= math.prod(copy)]
    if kind == "gqa":
        assert as_large == []
    else:
        assert as_large.count(copy) == 2 * config.num_hidden_layers  # K and V in every layer


# ------------------------------------------------------------------------------------------ sizes
SIZE_CONFIG = preset("tiny", num_hidden_layers=2, sliding_window=16)
CHECK_STEPS = (0, 1, 7, 8, 9, 24, 40)  # step i: the cache holds PROMPT_LEN + i positions


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", list(CACHES))
def test_nbytes_equals_kv_bytes(kind: str, batch: int) -> None:
    max_tokens = PROMPT_LEN + max(CHECK_STEPS) + 1
    cache = cache_for(kind, SIZE_CONFIG, batch, max_tokens)
    seen = []

    def check(step) -> None:
        if step.index in CHECK_STEPS:
            tokens = PROMPT_LEN + step.index
            assert cache.seq_len == tokens
            expected = kv_bytes(SIZE_CONFIG, batch, tokens, kind=kind, max_tokens=max_tokens)
            assert cache.nbytes == expected, (step.index, cache.nbytes, expected)
            if kind != "paged":  # the paged pool also holds free blocks; see test_paged_sizes
                assert sum(t.nbytes for t in cache.tensors()) == expected
            seen.append(step.index)

    generate(frozen(SIZE_CONFIG), prompt_for(SIZE_CONFIG, batch), max(CHECK_STEPS) + 1, cache=cache,
             inference_mode=True, on_step=check)
    assert seen == list(CHECK_STEPS)


def test_kv_bytes_formulas() -> None:
    cfg = preset("mistral-7b")  # 32 layers, 8 KV heads of 128, bf16: 128 KiB per token
    assert kv_bytes(cfg, 1, 1) == 2 * 32 * 8 * 128 * 2 == 131072
    assert kv_bytes(cfg, 3, 100) == 300 * 131072
    assert kv_bytes(cfg, 1, 100, dtype=torch.float32) == 2 * 100 * 131072
    assert kv_bytes(cfg, 2, 10, kind="static", max_tokens=64) == 2 * 64 * 131072
    assert kv_bytes(cfg, 1, 5000, kind="sliding") == 4096 * 131072
    assert kv_bytes(cfg, 1, 10, kind="int8") == 10 * 2 * 32 * 8 * (128 + 4)
    assert kv_bytes(cfg, 2, [1, 17], kind="paged") == (16 + 32) * 131072
    with pytest.raises(ValueError, match="max_tokens"):
        kv_bytes(cfg, 1, 10, kind="static")


def test_paged_sizes() -> None:
    config, lengths = SIZE_CONFIG, [1, 16, 17, 33]
    cache = make_cache("paged", config, len(lengths), block_size=16, num_blocks=2)  # forces pool growth
    prompts = [list(range(1, n + 1)) for n in lengths]
    generate_ragged(frozen(config), prompts, 1, cache)  # prefill only
    assert cache.lengths == lengths
    assert cache.nbytes == kv_bytes(config, len(lengths), lengths, kind="paged", block_size=16)
    assert cache.used_bytes == kv_bytes(config, len(lengths), lengths, kind="paged", block_size=1)
    assert 0 <= cache.waste_bytes < len(lengths) * cache.block_bytes  # under one block per sequence
    assert cache.pool_bytes == sum(t.nbytes for t in cache.tensors()) >= cache.nbytes
    cache.free_sequence(3)
    assert cache.nbytes == kv_bytes(config, 3, lengths[:3], kind="paged", block_size=16)


# ------------------------------------------------------------------------------------------ overflow
@pytest.mark.parametrize("kind", ["static", "gqa"])
def test_static_overflow_raises_before_writing(kind: str) -> None:
    config = TWO_LAYERS
    model, prompt = frozen(config), prompt_for(config, 2)
    cache = make_cache(kind, config, 2, max_tokens=PROMPT_LEN + 2)
    generate(model, prompt, 3, cache=cache)  # fills slots 0..PROMPT_LEN+1 exactly
    snapshot = [t.clone() for t in cache.tensors()] + [cache.key_positions.clone()]
    lengths = list(cache.lengths)
    with pytest.raises(CacheOverflowError, match=rf"max_tokens={PROMPT_LEN + 2}.*position {PROMPT_LEN + 2}"):
        model(prompt[:, :1], cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, [*cache.tensors(), cache.key_positions]))
    assert cache.lengths == lengths and cache.seq_len == PROMPT_LEN + 2

    empty = make_cache(kind, config, 1, max_tokens=4)
    with pytest.raises(CacheOverflowError):
        model(prompt[:1], cache=empty)  # a prefill longer than the cache
    assert empty.seq_len == 0 and (empty.key_positions == -1).all()
    assert all(not t.any() for t in empty.tensors())


def test_construction_errors() -> None:
    with pytest.raises(ValueError, match="unknown cache"):
        make_cache("ring", TWO_LAYERS)
    with pytest.raises(ValueError, match="sliding_window"):
        make_cache("sliding", TWO_LAYERS)
    with pytest.raises(ValueError, match="max_tokens"):
        make_cache("static", TWO_LAYERS)
    with pytest.raises(NotImplementedError, match="ragged"):
        make_cache("concat", TWO_LAYERS).for_sequence(0)


# ------------------------------------------------------------------------------------------ ragged
@pytest.mark.parametrize("kind", ["paged", "static", "gqa", "sliding"])
def test_ragged_rows_equal_decoding_each_prompt_alone(kind: str) -> None:
    config = preset("tiny", num_hidden_layers=2, sliding_window=6 if kind == "sliding" else None)
    model, steps = frozen(config), 24
    prompts = [list(range(3, 14)), [5, 900, 7], [42], list(range(100, 120, 3))]
    options = {"block_size": 4} if kind == "paged" else {}
    cache = make_cache(kind, config, len(prompts), max_tokens=max(map(len, prompts)) + steps, **options)
    rows = generate_ragged(model, prompts, steps, cache, inference_mode=True)
    for prompt, row in zip(prompts, rows):
        alone = generate(model, torch.tensor([prompt]), steps, cache=None, inference_mode=True).tokens[0]
        assert torch.equal(row, alone)
    assert cache.lengths == [len(p) + steps - 1 for p in prompts]
    if kind == "paged":
        lengths = cache.lengths
        assert cache.nbytes == kv_bytes(config, len(prompts), lengths, kind="paged", block_size=4)
        assert cache.waste_bytes < len(prompts) * cache.block_bytes


# ------------------------------------------------------------------------------------------ the leak
def retained_graph_bytes(run, exclude: set[int]) -> tuple[object, int]:
    """Run ``run()`` and return (its result, bytes of tensors autograd saved during it that are still
    alive afterwards), not counting storages in ``exclude`` (weights, the cache's own buffers).

    A saved tensor stays alive exactly as long as the graph node that saved it is reachable; the pack
    hook only takes a weak reference, so this measures what the run's outputs keep alive.
    """
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    storages = {}
    for ref in saved:
        t = ref()
        if t is not None:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return result, sum(n for ptr, n in storages.items() if ptr not in exclude)


LEAK_CONFIG = preset("tiny", num_hidden_layers=2, sliding_window=None)
LEAK_N = 24
# Variants whose retained per-step tensors grow with the sequence (repeat_kv copies of a growing
# cache, gathered blocks, scores): superlinear. static/gqa attend to a fixed-size buffer (sized here
# for the longest run) and sliding to at most a window, so each step retains about the same: linear.
SUPERLINEAR = {"concat", "int8", "paged"}


def leak_profile(kind: str, trainable: bool) -> tuple[list[int], list[object]]:
    config = LEAK_CONFIG.replace(sliding_window=16) if kind == "sliding" else LEAK_CONFIG
    model = random_model(config, "trainable" if trainable else "inference")
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes, caches = [], []
    for steps in (1, LEAK_N, 2 * LEAK_N):
        cache = cache_for(kind, config, 1, PROMPT_LEN + 2 * LEAK_N)
        out, held = retained_graph_bytes(lambda steps=steps, cache=cache: generate(model, prompt_for(config, 1), steps,
                                                                                   cache=cache),
                                         weights | {t.untyped_storage().data_ptr() for t in cache.tensors()})
        sizes.append(held)
        caches.append(cache)
        del out
    return sizes, caches


@pytest.mark.parametrize("kind", list(CACHES))
def test_trainable_weights_leak_with_every_cache(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    (prefill, at_n, at_2n), caches = leak_profile(kind, trainable=True)
    first, second = at_n - prefill, at_2n - at_n  # LEAK_N - 1 steps, then LEAK_N steps
    with capsys.disabled():
        print(f"\n[leak, {kind}] graph-held bytes: prefill {prefill}, {LEAK_N} steps {at_n}, "
              f"{2 * LEAK_N} steps {at_2n}; second half / first half = {second / first:.2f}")
    assert prefill > 0 and first > 0
    assert second >= first  # every step's graph is kept: growth never slows down
    if kind in SUPERLINEAR:
        assert second > 1.5 * first
    # The cache carries the graph: its tensors hang off the decode steps (int8: through its scales).
    assert any(t.grad_fn is not None for t in caches[-1].tensors())


@pytest.mark.parametrize("kind", list(CACHES))
def test_frozen_weights_retain_nothing_beyond_the_cache(kind: str) -> None:
    sizes, caches = leak_profile(kind, trainable=False)
    assert sizes == [0, 0, 0]
    assert not any(t.requires_grad for c in caches for t in c.tensors())


# ------------------------------------------------------------------------------------------ properties
HEADS = [(1, 1), (2, 2), (2, 1), (4, 2), (4, 1), (8, 2), (3, 1), (5, 1), (3, 3)]  # (query heads, KV heads)


@st.composite
def small_setups(draw):
    heads, kv_heads = draw(st.sampled_from(HEADS))
    config = MistralConfig(
        vocab_size=draw(st.integers(32, 160)), hidden_size=draw(st.sampled_from([16, 24, 32])),
        intermediate_size=draw(st.sampled_from([24, 48])), num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=draw(st.sampled_from([2, 4, 8])),
        sliding_window=draw(st.one_of(st.none(), st.integers(1, 10))), max_position_embeddings=64,
        torch_dtype="float32")
    return config, draw(st.integers(1, 2)), draw(st.integers(1, 12)), draw(st.integers(0, 2 ** 16))


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(small_setups())
def test_exact_variants_match_no_cache_on_random_configs(setup) -> None:
    config, batch, prompt_len, seed = setup
    steps = 20
    model = random_model(config, "inference", seed)
    prompt = prompt_for(config, batch, prompt_len, seed=seed)
    expected = generate(model, prompt, steps, cache=None, inference_mode=True).tokens
    for kind in kinds_for(config):
        cache = cache_for(kind, config, batch, prompt_len + steps, **({"block_size": 4} if kind == "paged" else {}))
        tokens = generate(model, prompt, steps, cache=cache, inference_mode=True).tokens
        assert torch.equal(tokens, expected), kind
