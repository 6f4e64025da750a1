"""Writing and reading checkpoints (kvlab.checkpoint reads, kvlab.checkpoint_write writes, kvlab.synthetic
builds): the tensor names and shapes a configuration expects, exact round trips, byte-identical output, a
save that validates first and leaves nothing behind when it fails, parity with transformers in both
directions, and a Mistral-7B layout checked from its headers alone. Whoever wrote a checkpoint, what it
holds must come back bit for bit."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import MINI, assert_same, pickle_payload, refused, write, write_raw

from kvlab import checkpoint_write, synthetic
from kvlab.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_NAME,
    expected_tensors,
    inspect_checkpoint,
    load_state_dict,
    read_shard,
)
from kvlab.checkpoint_files import TensorEntry
from kvlab.checkpoint_write import save_checkpoint
from kvlab.config import MistralConfig, preset
from kvlab.errors import CheckpointError
from kvlab.synthetic import build_checkpoint, random_state_dict

SMALL = preset("tiny", num_hidden_layers=2)  # a few MB: round trips, transformers parity


# ------------------------------------------------------------------------------------------ helpers
def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# ------------------------------------------------------------------------------------------ layout
def test_expected_tensors_names_shapes_order():
    names = list(expected_tensors(SMALL))
    assert names[0] == "model.embed_tokens.weight" and names[-2:] == ["model.norm.weight", "lm_head.weight"]
    assert len(names) == 2 + 9 * SMALL.num_hidden_layers + 1
    assert names.index("model.layers.0.post_attention_layernorm.weight") < names.index(
        "model.layers.1.self_attn.q_proj.weight")
    shapes = expected_tensors(MINI)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4 * 8, 32)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (2 * 8, 32)  # grouped-query attention
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (32, 4 * 8)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (32, 64)
    assert "lm_head.weight" not in expected_tensors(MINI.replace(tie_word_embeddings=True))


def test_random_state_dict_is_seeded():
    a, b, c = random_state_dict(MINI, 0), random_state_dict(MINI, 0), random_state_dict(MINI, 1)
    assert_same(a, b)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert torch.equal(a["model.norm.weight"], torch.ones(32))
    bf16 = random_state_dict(MINI.replace(torch_dtype="bfloat16"), 0)
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert torch.equal(bf16["lm_head.weight"], a["lm_head.weight"].bfloat16())


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("max_shard_bytes", [None, 1_500_000])
def test_round_trip_exact(tmp_path, max_shard_bytes):
    state = random_state_dict(SMALL, seed=3)
    directory = save_checkpoint(state, SMALL, tmp_path / "ckpt", max_shard_bytes=max_shard_bytes)
    config, loaded = load_state_dict(directory)
    assert config == SMALL
    assert_same(state, loaded)
    info = inspect_checkpoint(directory)
    if max_shard_bytes is None:
        assert [p.name for p in info.shards] == [SINGLE_NAME]
    else:
        index = json.loads((directory / INDEX_NAME).read_text())
        assert len(info.shards) > 2
        assert [p.name for p in info.shards] == sorted(set(index["weight_map"].values()))
        assert info.shards[0].name == f"model-00001-of-{len(info.shards):05d}.safetensors"
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
        assert sorted(n for names in info.by_shard().values() for n in names) == sorted(state)
        for names in info.by_shard().values():  # only a tensor larger than the limit exceeds it
            sizes = [state[name].numel() * state[name].element_size() for name in names]
            assert sum(sizes) <= max_shard_bytes or len(names) == 1


def test_bf16_round_trip_and_read_shard(tmp_path):
    config = MINI.replace(torch_dtype="bfloat16")
    state = random_state_dict(config)
    directory = save_checkpoint(state, config, tmp_path / "ckpt")
    assert_same(state, load_state_dict(directory)[1])
    some = read_shard(directory / SINGLE_NAME, ["model.norm.weight"])
    assert list(some) == ["model.norm.weight"]
    with pytest.raises(CheckpointError, match="no tensor.*nope"):
        read_shard(directory / SINGLE_NAME, ["nope"])


def test_tied_embeddings(tmp_path):
    config = MINI.replace(tie_word_embeddings=True)
    state = random_state_dict(config)
    assert "lm_head.weight" not in state
    directory = save_checkpoint(state, config, tmp_path / "tied")
    assert_same(state, load_state_dict(directory)[1])
    # A stored lm_head equal to the embedding is accepted (on save: dropped) ...
    with_copy = {**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}
    assert digests(save_checkpoint(with_copy, config, tmp_path / "tied2")) == digests(directory)
    write_raw(tmp_path / "copy", config, with_copy)
    assert_same(state, load_state_dict(tmp_path / "copy")[1])
    # ... a different one is not.
    with_other = {**state, "lm_head.weight": state["model.embed_tokens.weight"] + 1}
    write_raw(tmp_path / "other", config, with_other)
    refused(tmp_path / "other", "lm_head.weight", "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        save_checkpoint(with_other, config, tmp_path / "tied3")


def test_rotary_inv_freq_is_ignored(tmp_path):
    state = random_state_dict(MINI)
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    write_raw(tmp_path / "ckpt", MINI, {**state, inv_freq: torch.ones(4)})
    assert_same(state, load_state_dict(tmp_path / "ckpt")[1])
    assert inv_freq in inspect_checkpoint(tmp_path / "ckpt").extras
    write_raw(tmp_path / "other", MINI, {**state, "model.layers.0.self_attn.rotary_emb.cos": torch.ones(4)})
    refused(tmp_path / "other", "unexpected", "rotary_emb.cos", SINGLE_NAME)


# ------------------------------------------------------------------------------------------ writing
@pytest.mark.parametrize("max_shard_bytes", [None, 1_000_000])
def test_output_is_byte_identical(tmp_path, max_shard_bytes):
    first = save_checkpoint(random_state_dict(SMALL, 7), SMALL, tmp_path / "a", max_shard_bytes)
    reordered = dict(reversed(random_state_dict(SMALL, 7).items()))  # dict order must not matter
    second = save_checkpoint(reordered, SMALL, tmp_path / "b", max_shard_bytes)
    assert digests(first) == digests(second)
    files = 2 if max_shard_bytes is None else len(inspect_checkpoint(first).shards) + 2  # + config, index
    assert len(digests(first)) == files


@pytest.mark.parametrize("change, fragment", [
    (lambda s: s.pop("model.norm.weight"), "model.norm.weight"),
    (lambda s: s.update(extra=torch.ones(1)), "extra"),
    (lambda s: s.update({"model.norm.weight": torch.ones(31)}), "model.norm.weight"),
    (lambda s: s.update({"model.norm.weight": torch.ones(32, dtype=torch.float16)}), "model.norm.weight"),
    (lambda s: s.update({"model.norm.weight": [1.0] * 32}), "model.norm.weight"),
])
def test_save_validates_before_writing(tmp_path, change, fragment):
    state = random_state_dict(MINI)
    change(state)
    with pytest.raises(CheckpointError, match=fragment):
        save_checkpoint(state, MINI, tmp_path / "out" / "ckpt")
    assert not (tmp_path / "out").exists()


def test_failed_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    real, calls = checkpoint_write.save_file, []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_write, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path / "ckpt", max_shard_bytes=20_000)
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor the temporary directory


def test_overwrite(tmp_path):
    directory = write(tmp_path / "ckpt", seed=0)
    with pytest.raises(CheckpointError, match="already exists"):
        write(directory, seed=1)
    assert_same(random_state_dict(MINI, 0), load_state_dict(directory)[1])
    write(directory, seed=1, overwrite=True)
    assert_same(random_state_dict(MINI, 1), load_state_dict(directory)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty")  # an empty directory is filled without overwrite=True
    assert inspect_checkpoint(tmp_path / "empty").config == MINI


def test_build_checkpoint(tmp_path, monkeypatch):
    directory = build_checkpoint("tiny", root=tmp_path, seed=2)
    assert directory == tmp_path / "tiny-seed2"
    stamp = (directory / SINGLE_NAME).stat().st_mtime_ns
    assert build_checkpoint("tiny", root=tmp_path, seed=2) == directory  # complete: not rewritten
    assert (directory / SINGLE_NAME).stat().st_mtime_ns == stamp
    assert_same(random_state_dict(preset("tiny"), 2), load_state_dict(directory)[1])
    # A config rather than a preset gets a stable hashed name; a broken leftover is rebuilt.
    named = build_checkpoint(MINI, root=tmp_path)
    assert named.name.startswith("config-") and named == build_checkpoint(MINI, root=tmp_path)
    (named / SINGLE_NAME).write_bytes(b"garbage")
    assert build_checkpoint(MINI, root=tmp_path) == named
    assert_same(random_state_dict(MINI), load_state_dict(named)[1])
    sharded = build_checkpoint(MINI, root=tmp_path, max_shard_bytes=20_000)
    assert len(inspect_checkpoint(sharded).shards) > 1
    monkeypatch.setenv("KVLAB_DATA", str(tmp_path / "data"))
    assert synthetic.default_checkpoint_root() == tmp_path / "data" / "checkpoints"
    assert build_checkpoint(MINI) == tmp_path / "data" / "checkpoints" / named.name


# ------------------------------------------------------------------------------------------ transformers
@pytest.mark.parametrize("tied, max_shard_bytes", [(False, 1_500_000), (True, None)])
def test_transformers_loads_kvlab_checkpoint(tmp_path, transformers, tied, max_shard_bytes):
    config = SMALL.replace(tie_word_embeddings=tied)
    state = random_state_dict(config)
    save_checkpoint(state, config, tmp_path / "ckpt", max_shard_bytes=max_shard_bytes)
    model, report = transformers.MistralForCausalLM.from_pretrained(str(tmp_path / "ckpt"),
                                                                output_loading_info=True)
    assert not report["missing_keys"] and not report["unexpected_keys"] and not report["mismatched_keys"]
    theirs = model.state_dict()
    assert_same(state, {name: theirs[name] for name in state})


def _save_pretrained(transformers, directory: Path, tied: bool, max_shard_size) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    hf_config = transformers.MistralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    model = transformers.MistralForCausalLM(hf_config)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return {name: t.detach() for name, t in model.state_dict().items()}


@pytest.mark.parametrize("tied, max_shard_size", [(False, "20KB"), (True, None)])
def test_kvlab_reads_transformers_weights(tmp_path, transformers, tied, max_shard_size):
    theirs = _save_pretrained(transformers, tmp_path, tied, max_shard_size or "50GB")
    assert ((tmp_path / INDEX_NAME).exists()) == (max_shard_size is not None)
    hf = json.loads((tmp_path / CONFIG_NAME).read_text())
    rope = hf.pop("rope_parameters", None)  # transformers >= 5; see the test below
    if rope is not None:
        hf["rope_theta"] = rope["rope_theta"]
        (tmp_path / CONFIG_NAME).write_text(json.dumps(hf))
    config, ours = load_state_dict(tmp_path)
    assert config.num_hidden_layers == 2 and config.tie_word_embeddings == tied and config.head_dim == 8
    assert_same(ours, {name: theirs[name] for name in ours})


def test_kvlab_reads_transformers_config_json(tmp_path, transformers):
    _save_pretrained(transformers, tmp_path, False, "50GB")
    config, _ = load_state_dict(tmp_path)
    assert config.rope_theta == 10000.0


# ------------------------------------------------------------------------------------------ 7B layout
MISTRAL_7B_CONFIG = {  # config.json of the Hugging Face Mistral-7B-v0.1 repository
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def test_mistral_7b_layout_validates_from_headers_alone(tmp_path):
    """A downloaded 7B checkpoint's layout: two bf16 shards (sparse files here: 14.5 GB of holes),
    inv_freq buffers, and pickle shards beside them that must be left alone."""
    config = MistralConfig.from_dict(MISTRAL_7B_CONFIG)
    assert config == preset("mistral-7b")
    entries = {name: ("BF16", shape) for name, shape in expected_tensors(config).items()}
    entries.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": ("F32", (64,)) for i in range(32)})
    names = list(entries)
    half = names.index("model.layers.16.self_attn.q_proj.weight")
    weight_map = {}
    for i, group in enumerate([names[:half], names[half:]], start=1):
        shard, offset, header = f"model-0000{i}-of-00002.safetensors", 0, {"__metadata__": {"format": "pt"}}
        for name in sorted(group):
            dtype, shape = entries[name]
            size = (2 if dtype == "BF16" else 4) * math.prod(shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = shard
        raw = json.dumps(header).encode()
        with open(tmp_path / shard, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)
        if (tmp_path / shard).stat().st_blocks * 512 > 2**24:
            pytest.skip("this filesystem does not keep sparse files sparse")
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 14483464192},
                                                   "weight_map": weight_map}))
    (tmp_path / CONFIG_NAME).write_text(json.dumps(MISTRAL_7B_CONFIG))
    marker = tmp_path / "unpickled"
    for name in ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]:
        (tmp_path / name).write_bytes(pickle_payload(marker))
    info = inspect_checkpoint(tmp_path)
    assert info.config == config and [p.name for p in info.shards] == sorted(set(weight_map.values()))
    assert len(info.tensors) == 291 and len(info.extras) == 32
    assert sum(math.prod(e.shape) for e in info.tensors.values()) == 7_241_732_096
    lm_head = info.tensors["lm_head.weight"]
    assert lm_head == TensorEntry(info.shards[1], torch.bfloat16, (32000, 4096))
    assert not marker.exists()
