"""Fuzzed checkpoints, generated with hypothesis: truncated files and flipped header bytes, random values in
every header field, shuffled, duplicated and mangled tensor names, junk spliced into the header text, and
broken shard indexes and config.json files, some with a shard replaced by a code-running pickle. Every case
must either load back exactly or be refused with a CheckpointError naming the checkpoint; it must never
fail any other way, call torch.load, or run the pickle. KVLAB_FUZZ_EXAMPLES sets the number of examples."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from unittest import mock

from checkpoint_helpers import MINI, _zip_with, assert_same, pack, pickle_payload, split, write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvlab.checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, inspect_checkpoint, load_state_dict
from kvlab.checkpoint_files import DTYPES
from kvlab.errors import CheckpointError
from kvlab.synthetic import random_state_dict

FUZZ_CASES: Counter[tuple[str, str]] = Counter()  # fuzz examples run, per test and outcome


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
