"""Malformed and hostile checkpoints: missing and truncated files, corrupt headers, header lengths, offsets
and shapes that lie, duplicate tensor names, tensors that do not match config.json, a bad config.json,
broken shard indexes, and pickle files where safetensors belong. Each must be refused with a CheckpointError
(a ConfigError for config.json) that names the file and the tensor or field at fault, so that a user knows
what to fix; and nothing is ever unpickled, since a pickle can run any code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from checkpoint_helpers import (
    MINI,
    _zip_with,
    assert_same,
    pack,
    pickle_payload,
    refused,
    split,
    write,
    write_raw,
)

from kvlab.checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, inspect_checkpoint, load_state_dict, read_shard
from kvlab.errors import ConfigError
from kvlab.synthetic import random_state_dict


# ------------------------------------------------------------------------------------------ helpers
def edit_header(directory: Path, change, file: str = SINGLE_NAME) -> None:
    """Rewrite one file's header after ``change`` edits it in place."""
    raw, data = split((directory / file).read_bytes())
    header = json.loads(raw)
    change(header)
    (directory / file).write_bytes(pack(header, data))


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
