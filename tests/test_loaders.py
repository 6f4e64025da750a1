"""The four loaders read the same checkpoint; only how they hold the weights differs — and that alone
decides whether decoding leaks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvlab.caches import ConcatCache
from kvlab.errors import CheckpointError
from kvlab.generate import generate
from kvlab.loaders import LOADERS, load_model
from kvlab.memory.leakguard import kv_bytes_per_token, measure_retained
from kvlab.quant import Int8Linear
from kvlab.synthetic import build_checkpoint

PROMPT = torch.tensor([[1, 2, 3, 4]])
N = 48  # retained memory is measured after N and 2N decode steps


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Two shards, so the threaded loader really runs one thread per shard.
    return build_checkpoint("tiny", root=tmp_path_factory.mktemp("ckpt"), max_shard_bytes=8 * 2**20)


@pytest.fixture(scope="module")
def runs(checkpoint: Path) -> dict[str, dict]:
    """Per loader: tokens after 2N steps, and the bytes kept alive after N and 2N steps."""
    out = {}
    for loader in LOADERS:
        model = load_model(checkpoint, loader)
        kept = {}

        def probe(step, model=model, kept=kept) -> None:
            if step.index + 1 in (N, 2 * N):
                kept[step.index + 1] = measure_retained((step.cache, step.logits), model)

        tokens = generate(model, PROMPT, 2 * N, cache=ConcatCache(model.config.num_hidden_layers), on_step=probe).tokens
        out[loader] = dict(tokens=tokens, kept=kept, config=model.config, model=model)
    return out


def test_sharded_checkpoint_has_several_shards(checkpoint: Path) -> None:
    assert len(list(checkpoint.glob("model-*-of-*.safetensors"))) >= 2


def test_loaders_hold_weights_as_described(runs) -> None:
    for loader in ("trainable", "threaded"):
        assert all(p.requires_grad for p in runs[loader]["model"].parameters())
    assert not any(p.requires_grad for p in runs["inference"]["model"].parameters())
    int8 = runs["int8"]["model"]
    assert isinstance(int8.model.layers[0].self_attn.q_proj, Int8Linear) and isinstance(int8.lm_head, Int8Linear)
    assert not any(t.requires_grad for t in [*int8.parameters(), *int8.buffers()])


def test_float_loaders_give_identical_tokens(runs) -> None:
    reference = runs["inference"]["tokens"]
    assert torch.equal(runs["trainable"]["tokens"], reference)
    assert torch.equal(runs["threaded"]["tokens"], reference)


def test_int8_agrees_with_float_on_the_same_sequence(runs) -> None:
    """Free-running greedy decodes part ways at the first near-tie and never meet again, so agreement
    is measured teacher-forced: both models read the float model's sequence, position by position."""
    sequence = runs["inference"]["tokens"]
    with torch.no_grad():
        ref = runs["inference"]["model"](sequence)
        q = runs["int8"]["model"](sequence)
    agreement = (ref.argmax(-1) == q.argmax(-1)).float().mean().item()
    error = (ref - q).abs().max().item() / ref.abs().max().item()
    print(f"int8 vs float: next-token agreement {agreement:.1%}, max logit error {error:.1%} of max |logit|")
    assert agreement >= 0.9 and error < 0.05


@pytest.mark.parametrize("loader", ["trainable", "threaded"])
def test_trainable_loaders_leak_superlinearly(runs, loader: str) -> None:
    kept = runs[loader]["kept"]
    assert kept[2 * N].saved_bytes >= 3 * kept[N].saved_bytes  # quadratic: about 4x for 2x tokens
    assert kept[2 * N].total_bytes > 20 * kept[2 * N].cache_bytes


@pytest.mark.parametrize("loader", ["inference", "int8"])
def test_fixed_loaders_keep_only_the_kv_cache(runs, loader: str) -> None:
    run = runs[loader]
    kept = run["kept"][2 * N]
    cached_positions = PROMPT.shape[1] + 2 * N - 1  # the last chosen token is never fed back
    assert kept.cache_bytes == kv_bytes_per_token(run["config"]) * cached_positions
    assert kept.saved_bytes == 0 and not kept.has_graph
    assert kept.total_bytes - kept.cache_bytes < 64 * 1024  # logits and position bookkeeping


def test_a_bad_checkpoint_returns_no_model(checkpoint: Path, tmp_path: Path, copy_checkpoint) -> None:
    broken = copy_checkpoint(checkpoint, tmp_path / "broken")
    last = sorted(broken.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])  # truncate the second shard
    for loader in LOADERS:
        with pytest.raises(CheckpointError, match=last.name):
            load_model(broken, loader)
