"""Checkpoints (kvlab.checkpoint reads, kvlab.checkpoint_write writes, kvlab.synthetic builds): exact
round trips, byte-identical output, transformers parity, and a CheckpointError naming the file and
tensor or field for every malformed checkpoint, fuzzed included."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import zipfile
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

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
from kvlab.checkpoint_files import DTYPES, TensorEntry
from kvlab.checkpoint_write import save_checkpoint
from kvlab.config import MistralConfig, preset
from kvlab.errors import CheckpointError, ConfigError
from kvlab.synthetic import build_checkpoint, random_state_dict

SMALL = preset("tiny", num_hidden_layers=2)  # a few MB: round trips, transformers parity
# A few KB, so that every bad-input and fuzz case can afford to write a whole checkpoint.
MINI = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=None,
                     max_position_embeddings=128, torch_dtype="float32")
FUZZ_CASES: Counter[tuple[str, str]] = Counter()  # fuzz examples run, per test and outcome


# ------------------------------------------------------------------------------------------ helpers
def write(directory: Path, config: MistralConfig = MINI, seed: int = 0, **kwargs) -> Path:
    return save_checkpoint(random_state_dict(config, seed), config, directory, **kwargs)


def write_raw(directory: Path, config: MistralConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint written without save_checkpoint's validation, to build bad ones."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory / CONFIG_NAME)
    tensors = {name: t.clone() for name, t in tensors.items()}  # safetensors refuses shared storage
    save_file(tensors, directory / SINGLE_NAME, metadata={"format": "pt"})
    return directory


def split(blob: bytes) -> tuple[bytes, bytes]:
    """A safetensors file's header bytes and data bytes."""
    n = int.from_bytes(blob[:8], "little")
    return blob[8:8 + n], blob[8 + n:]


def pack(header: bytes | dict, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def edit_header(directory: Path, change, file: str = SINGLE_NAME) -> None:
    """Rewrite one file's header after ``change`` edits it in place."""
    raw, data = split((directory / file).read_bytes())
    header = json.loads(raw)
    change(header)
    (directory / file).write_bytes(pack(header, data))


def refused(directory: Path, *fragments: str) -> str:
    """Loading fails with a CheckpointError whose message holds every fragment."""
    with pytest.raises(CheckpointError) as info:
        load_state_dict(directory)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def pickle_payload(marker: Path) -> bytes:
    """Protocol-2 pickle bytes that, if ever unpickled, would call exec() and create ``marker``."""
    code = f"open({str(marker)!r}, 'w').write('unpickled')".encode()
    return b"\x80\x02cbuiltins\nexec\n(X" + len(code).to_bytes(4, "little") + code + b"tR."


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


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def ckpt(tmp_path) -> Path:
    return write(tmp_path / "ckpt")


@pytest.fixture
def sharded(tmp_path) -> Path:
    directory = write(tmp_path / "sharded", max_shard_bytes=10_000)
    assert len(inspect_checkpoint(directory).shards) >= 3
    return directory


def test_missing_files(tmp_path, ckpt):
    refused(tmp_path / "nowhere", "nowhere", "not a checkpoint directory")
    (ckpt / CONFIG_NAME).unlink()
    with pytest.raises(ConfigError, match="config.json.*missing"):
        inspect_checkpoint(ckpt)
    write(tmp_path / "other")
    (tmp_path / "other" / SINGLE_NAME).unlink()
    refused(tmp_path / "other", "other", SINGLE_NAME, INDEX_NAME)


def test_truncated_file(ckpt):
    blob = (ckpt / SINGLE_NAME).read_bytes()
    header_end = 8 + int.from_bytes(blob[:8], "little")
    for cut in [0, 1, 7, 8, 9, header_end // 2, header_end - 1, header_end, header_end + 1, len(blob) - 1]:
        (ckpt / SINGLE_NAME).write_bytes(blob[:cut])
        refused(ckpt, SINGLE_NAME)
    (ckpt / SINGLE_NAME).write_bytes(blob + b"\0")
    refused(ckpt, SINGLE_NAME, "not covered")


@pytest.mark.parametrize("header, fragment", [
    (b"[1, 2]", "not a JSON object"),
    (b"{\"a\": ", "not valid UTF-8 JSON"),
    (b"{\"model.norm.\xff\": 1}", "not valid UTF-8 JSON"),
    (b"{\"\\ud800\": 1}", "not valid UTF-8 JSON"),
    (b"{\"__metadata__\": {\"format\": 1}}", "__metadata__"),
    (b"{\"__metadata__\": {\"format\": \"pt\"}, \"__metadata__\": {}}", "duplicate key '__metadata__'"),
    (b"{\"x\": {\"dtype\": \"F32\", \"shape\": [NaN], \"data_offsets\": [0, 4]}}", "NaN"),
])
def test_corrupt_header(ckpt, header, fragment):
    _, data = split((ckpt / SINGLE_NAME).read_bytes())
    (ckpt / SINGLE_NAME).write_bytes(pack(header, data))
    refused(ckpt, SINGLE_NAME, fragment)


@pytest.mark.parametrize("length", [2**20, 2**60, 2**64 - 1, 100_000_001])
def test_header_length_beyond_file(ckpt, length):
    blob = (ckpt / SINGLE_NAME).read_bytes()
    (ckpt / SINGLE_NAME).write_bytes(length.to_bytes(8, "little") + blob[8:])
    refused(ckpt, SINGLE_NAME, f"header length {length}")


NORM = "model.norm.weight"
EMBED = "model.embed_tokens.weight"


@pytest.mark.parametrize("change, fragments", [
    (lambda h: h[NORM].update(data_offsets=[0, 128]), ("overlaps", NORM)),
    (lambda h: h[EMBED].update(data_offsets=h["lm_head.weight"]["data_offsets"]), ("overlaps", EMBED)),
    (lambda h: h[NORM].update(data_offsets=[10**9, 10**9 + 128]), ("data_offsets", NORM)),
    (lambda h: h[NORM].update(data_offsets=[-4, 124]), ("data_offsets", NORM)),
    (lambda h: h[NORM].update(data_offsets=[h[NORM]["data_offsets"][0], h[NORM]["data_offsets"][1] - 4]),
     ("does not fill", NORM)),
    (lambda h: h[NORM].update(data_offsets=[4, 0]), ("data_offsets", NORM)),
    (lambda h: h[NORM].update(data_offsets=[0, 128.0]), ("data_offsets", NORM)),
    (lambda h: h[NORM].update(shape=[2**20, 2**20]), ("does not fill", NORM)),
    (lambda h: h[NORM].update(shape=[2**62] * 8), ("does not fill", NORM)),
    (lambda h: h[NORM].update(shape=[-32]), ("shape", NORM)),
    (lambda h: h[NORM].update(shape=[True] * 32), ("shape", NORM)),
    (lambda h: h[NORM].update(dtype="F31"), ("unknown dtype 'F31'", NORM)),
    (lambda h: h[NORM].update(dtype=["F32"]), ("unknown dtype", NORM)),
    (lambda h: h[NORM].update(extra=1), ("exactly", NORM)),
    (lambda h: h[NORM].pop("shape"), ("exactly", NORM)),
    (lambda h: h.update({NORM: [1, 2]}), ("exactly", NORM)),
])
def test_offsets_and_entries_that_lie(ckpt, change, fragments):
    edit_header(ckpt, change)
    refused(ckpt, SINGLE_NAME, *fragments)


def test_duplicate_name_in_header(ckpt):
    raw, data = split((ckpt / SINGLE_NAME).read_bytes())
    header = json.loads(raw)
    entry = json.dumps(header[NORM]).encode()
    (ckpt / SINGLE_NAME).write_bytes(pack(raw.rstrip()[:-1] + b', "%s": %s}' % (NORM.encode(), entry), data))
    refused(ckpt, SINGLE_NAME, f"duplicate key {NORM!r}")


def test_tensors_that_do_not_match_config(tmp_path):
    state = random_state_dict(MINI)
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "model.layers.0.mlp.up_proj.weight"},
                    ("missing", "model.layers.0.mlp.up_proj.weight")),
        "unexpected": ({**state, "model.layers.1.mlp.up_proj.weight": state[NORM]},
                       ("unexpected", "model.layers.1.mlp.up_proj.weight")),
        "shape": ({**state, NORM: torch.ones(33)}, ("shape (33,)", NORM)),
        "dtype": ({**state, NORM: torch.ones(32, dtype=torch.float16)}, ("float16", NORM, "float32")),
        "all_f16": ({k: v.half() for k, v in state.items()}, ("torch.float16", "torch_dtype float32")),
    }
    for name, (tensors, fragments) in cases.items():
        refused(write_raw(tmp_path / name, MINI, tensors), str(tmp_path / name), *fragments)
    # More layers in config.json than in the weights: refused before listing a billion names.
    write(tmp_path / "layers")
    hf = json.loads((tmp_path / "layers" / CONFIG_NAME).read_text())
    (tmp_path / "layers" / CONFIG_NAME).write_text(json.dumps({**hf, "num_hidden_layers": 10**9}))
    refused(tmp_path / "layers", "num_hidden_layers=1000000000")


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not valid UTF-8 JSON"),
    ("[]", "JSON object"),
    ('{"hidden_size": 32}', "missing field"),
    ("DROP hidden_size", "hidden_size"),
    ('SET {"hidden_size": "32"}', "hidden_size"),
    ('SET {"hidden_size": 32.0}', "hidden_size"),
    ('SET {"hidden_act": "gelu"}', "hidden_act"),
    ('SET {"torch_dtype": ["float32"]}', "torch_dtype"),
    ('SET {"rope_theta": Infinity}', "Infinity"),
    ('SET {"flash": true}', "flash"),
    ("DUPLICATE", "duplicate key"),
])
def test_bad_config_json(ckpt, text, fragment):
    path = ckpt / CONFIG_NAME
    good = json.loads(path.read_text())
    if text.startswith("DROP "):
        good.pop(text[5:])
        text = json.dumps(good)
    elif text.startswith("SET "):
        text = json.dumps({**good, **json.loads(text[4:])})
    elif text == "DUPLICATE":
        text = json.dumps(good)[:-1] + ', "vocab_size": 64}'
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        inspect_checkpoint(ckpt)
    assert CONFIG_NAME in str(info.value) and fragment in str(info.value), str(info.value)


def test_pickle_files_are_refused_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle_payload(marker)
    with mock.patch("torch.load", side_effect=AssertionError("torch.load called")):
        # A pytorch_model.bin where safetensors is expected.
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        MINI.save(bin_dir / CONFIG_NAME)
        (bin_dir / "pytorch_model.bin").write_bytes(payload)
        message = refused(bin_dir, "pytorch_model.bin", "convert it to safetensors")
        assert "pickle" in message
        # Pickle and zip (torch.save) bytes under the safetensors name, and an index naming a .bin shard.
        for name, blob in [("raw", payload), ("zip", _zip_with(payload))]:
            write(tmp_path / name)
            (tmp_path / name / SINGLE_NAME).write_bytes(blob)
            refused(tmp_path / name, SINGLE_NAME, "not safetensors", "convert it to safetensors")
        write(tmp_path / "index", max_shard_bytes=10_000)
        (tmp_path / "index" / "pytorch_model-00001-of-00001.bin").write_bytes(payload)
        index = json.loads((tmp_path / "index" / INDEX_NAME).read_text())
        index["weight_map"][NORM] = "pytorch_model-00001-of-00001.bin"
        (tmp_path / "index" / INDEX_NAME).write_text(json.dumps(index))
        refused(tmp_path / "index", INDEX_NAME, NORM, "pytorch_model-00001-of-00001.bin")
    assert not marker.exists()


def _zip_with(payload: bytes) -> bytes:
    """What torch.save writes: a zip archive holding a pickle."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
    return buffer.getvalue()


def test_index_problems(sharded):
    index_path = sharded / INDEX_NAME
    good = json.loads(index_path.read_text())
    by_shard: dict[str, list[str]] = {}
    for name, shard in good["weight_map"].items():
        by_shard.setdefault(shard, []).append(name)
    first = next(shard for shard, names in sorted(by_shard.items()) if len(names) > 1)
    second = next(shard for shard in sorted(by_shard) if shard != first)
    moved = by_shard[first][0]

    def with_map(**changes):
        index_path.write_text(json.dumps({**good, "weight_map": {**good["weight_map"], **changes}}))

    with_map(**{moved: "model-00009-of-00009.safetensors"})
    refused(sharded, "model-00009-of-00009.safetensors", "missing")
    with_map(**{moved: second})
    refused(sharded, INDEX_NAME, moved, second, f"it is in {first}")
    with_map(**{"model.layers.7.mlp.up_proj.weight": first})
    refused(sharded, INDEX_NAME, "model.layers.7.mlp.up_proj.weight", "no shard holds it")
    with_map(**{moved: "../ckpt/model.safetensors"})
    refused(sharded, INDEX_NAME, moved, "../ckpt/model.safetensors")
    without = {k: v for k, v in good["weight_map"].items() if k != moved}
    index_path.write_text(json.dumps({"weight_map": without}))
    refused(sharded, first, moved, "not in the weight_map")
    index_path.write_text('{"weight_map": []}')
    refused(sharded, INDEX_NAME, "weight_map")
    index_path.write_text(json.dumps(good))
    assert_same(random_state_dict(MINI), load_state_dict(sharded)[1])
    shutil.copy(sharded / first, sharded / SINGLE_NAME)
    refused(sharded, "keep only one")


def test_duplicate_name_across_shards(sharded):
    index = json.loads((sharded / INDEX_NAME).read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    name = next(n for n, shard in index["weight_map"].items() if shard == second)
    raw, data = split((sharded / first).read_bytes())
    header = json.loads(raw)
    extra = read_shard(sharded / second, [name])[name]
    end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
    header[name] = {"dtype": "F32", "shape": list(extra.shape),
                    "data_offsets": [end, end + 4 * extra.numel()]}
    (sharded / first).write_bytes(pack(header, data + extra.numpy().tobytes()))
    refused(sharded, second, name, f"also in {first}")


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


# ------------------------------------------------------------------------------------------ fuzzing
# About 10 s for the four fuzz tests together; KVLAB_FUZZ_EXAMPLES=5000 for a deeper run.
FUZZ = settings(max_examples=int(os.environ.get("KVLAB_FUZZ_EXAMPLES", "400")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


class _Fuzz:
    """One valid MINI checkpoint, and a scratch copy whose files each fuzz example replaces."""

    def __init__(self, root: Path, **kwargs) -> None:
        self.base = write(root / "base", **kwargs)
        self.case = root / "case"
        shutil.copytree(self.base, self.case)
        self.state = random_state_dict(MINI)
        self.files = {p.name: p.read_bytes() for p in self.base.iterdir()}
        self.on_disk = dict(self.files)
        self.marker = root / "unpickled"

    def run(self, label: str, **files: bytes) -> None:
        """Write the mutated files, then demand a CheckpointError naming a file, or an exact load."""
        for name, blob in self.files.items():
            if self.on_disk[name] != files.get(name, blob):  # rewrite only what changed: disks are slow
                self.on_disk[name] = files.get(name, blob)
                (self.case / name).write_bytes(self.on_disk[name])
        try:
            with mock.patch("torch.load", side_effect=AssertionError("torch.load called")):
                inspect_checkpoint(self.case)
        except CheckpointError as exc:
            assert str(self.case) in str(exc), str(exc)
            FUZZ_CASES[label, "refused"] += 1
        else:  # accepted headers must then read back exactly: inspect is as strict as safetensors
            assert_same(self.state, load_state_dict(self.case)[1])
            FUZZ_CASES[label, "loaded"] += 1
        assert not self.marker.exists()


def _report(label: str) -> None:
    counts = {outcome: FUZZ_CASES[label, outcome] for outcome in ("refused", "loaded")}
    print(f"fuzz {label}: {sum(counts.values())} cases {counts}")
    assert counts["refused"] > 0


def test_fuzz_truncation_and_flipped_bytes(tmp_path):
    fuzz = _Fuzz(tmp_path)
    blob = fuzz.files[SINGLE_NAME]
    header_end = 8 + int.from_bytes(blob[:8], "little")

    @FUZZ
    @given(cut=st.integers(0, len(blob)),
           flips=st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), max_size=3))
    def case(cut, flips):
        mutated = bytearray(blob)
        for position, value in flips:
            mutated[position] = value
        fuzz.run("bytes", **{SINGLE_NAME: bytes(mutated[:cut])})

    case()
    _report("bytes")


_JSON = st.recursive(  # any JSON value
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
_HUGE = st.integers(2**31, 2**64 - 1)


def test_fuzz_header_fields(tmp_path):
    fuzz = _Fuzz(tmp_path)
    raw, data = split(fuzz.files[SINGLE_NAME])
    header = json.loads(raw)
    names = sorted(header)
    field_values = {
        "dtype": st.sampled_from([*DTYPES, "F32", "f32", "F4", "", "I128"]) | _JSON,
        "shape": st.lists(st.integers(-2, 70) | _HUGE, max_size=6) | _JSON,
        "data_offsets": st.lists(st.integers(-8, len(data) + 8) | _HUGE, min_size=2, max_size=2) | _JSON,
    }

    @FUZZ
    @given(name=st.sampled_from(names), field=st.sampled_from(sorted(field_values)), data_=st.data(),
           length=st.none() | _HUGE | st.integers(0, len(raw) + 16))
    def case(name, field, data_, length):
        edited = json.loads(raw)
        if name == "__metadata__":
            edited[name] = data_.draw(_JSON | st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
        else:
            edited[name][field] = data_.draw(field_values[field])
        body = json.dumps(edited).encode()
        prefix = (len(body) if length is None else length).to_bytes(8, "little")
        fuzz.run("fields", **{SINGLE_NAME: prefix + body + data})

    case()
    _report("fields")


def test_fuzz_names_and_raw_header_text(tmp_path):
    """Duplicate names, non-UTF-8 names, and arbitrary splices into the header text."""
    fuzz = _Fuzz(tmp_path)
    raw, data = split(fuzz.files[SINGLE_NAME])
    entries = [json.dumps({k: v}).encode()[1:-1] for k, v in json.loads(raw).items()]

    @FUZZ
    @given(order=st.permutations(range(len(entries))), duplicate=st.none() | st.integers(0, len(entries) - 1),
           rename=st.none() | st.tuples(st.integers(0, len(entries) - 1), st.binary(max_size=6)),
           splice=st.none() | st.tuples(st.integers(0, 400), st.binary(max_size=6)))
    def case(order, duplicate, rename, splice):
        parts = [entries[i] for i in order] + ([entries[duplicate]] if duplicate is not None else [])
        if rename is not None:  # raw bytes (often not UTF-8) inside a tensor name
            i, junk = rename
            parts[i] = parts[i].replace(b'weight"', b"weight" + junk.replace(b'"', b"") + b'"', 1)
        body = b"{" + b", ".join(parts) + b"}"
        if splice is not None:
            at, junk = splice
            body = body[:at] + junk + body[at:]
        fuzz.run("names", **{SINGLE_NAME: pack(body, data)})

    case()
    _report("names")


def test_fuzz_index_and_config(tmp_path):
    fuzz = _Fuzz(tmp_path, max_shard_bytes=10_000)
    index = json.loads(fuzz.files[INDEX_NAME])
    config = json.loads(fuzz.files[CONFIG_NAME])
    names, shards = sorted(index["weight_map"]), sorted(set(index["weight_map"].values()))
    shard_names = st.sampled_from(shards + ["pytorch_model.bin", "../base/" + shards[0], "x.safetensors", ""])

    @FUZZ
    @given(moves=st.dictionaries(st.sampled_from(names + ["lm_head.bias"]), shard_names | _JSON, max_size=3),
           drop=st.none() | st.sampled_from(names),
           config_change=st.none() | st.tuples(st.sampled_from(sorted(config) + ["extra"]), _JSON),
           prefix=st.none() | st.tuples(st.integers(0, 80), st.sampled_from(["pickle", "zip"])))
    def case(moves, drop, config_change, prefix):
        weight_map = {**index["weight_map"], **moves}
        weight_map.pop(drop, None)
        new_config = dict(config)
        if config_change is not None:
            new_config[config_change[0]] = config_change[1]
        files = {INDEX_NAME: json.dumps({**index, "weight_map": weight_map}).encode(),
                 CONFIG_NAME: json.dumps(new_config).encode()}
        if prefix is not None:  # a shard replaced by (a prefix of) a code-running pickle
            cut, kind = prefix
            payload = pickle_payload(fuzz.marker)
            blob = payload if kind == "pickle" else _zip_with(payload)
            files[shards[0]] = blob[:len(blob) - cut]
        fuzz.run("index+config", **files)

    case()
    _report("index+config")


def test_fuzz_cases_were_counted():
    """Runs last in this file: the total, for the test log (pytest -s or -rA)."""
    total = sum(FUZZ_CASES.values())
    print(f"fuzz total: {total} cases, {dict(FUZZ_CASES)}")
    if total:
        assert total >= 4 * 50
