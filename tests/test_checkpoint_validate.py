"""What loading refuses, validation refuses: special files in place of checkpoint files, and a tied
``lm_head`` that differs from the embedding; what loads is reported, never refused.

Special files are made with ``os.mkfifo``; an ``open`` of a FIFO blocks until a writer appears, so every
such case runs under a deadline and fails instead of hanging.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from checkpoint_helpers import MINI
from safetensors.torch import save_file

from kvlab.checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, inspect_checkpoint, validate_checkpoint
from kvlab.config import MistralConfig
from kvlab.errors import CheckpointError, ConfigError
from kvlab.loaders import LOADERS, load_model
from kvlab.synthetic import build_checkpoint, random_state_dict


@contextmanager
def deadline(seconds: int = 10) -> Iterator[None]:
    """Fail instead of hanging: a blocked ``open`` of a FIFO is interrupted by SIGALRM."""
    def expired(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(MINI, root=tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(MINI, root=tmp_path_factory.mktemp("sharded"), max_shard_bytes=10_000)


def refused_everywhere(directory: Path, error: type[CheckpointError], *fragments: str) -> None:
    """validate_checkpoint and every loader raise ``error`` with one same message, holding ``fragments``."""
    messages = set()
    with deadline():
        for check in (validate_checkpoint, *(lambda d, name=name: load_model(d, name) for name in LOADERS)):
            with pytest.raises(error) as info:
                check(directory)
            messages.add(str(info.value))
    assert len(messages) == 1, messages
    message = messages.pop()
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def replaced(source: Path, target: Path, name: str, by: str) -> Path:
    """A copy of ``source`` whose file ``name`` is a FIFO (``by="fifo"``) or an empty directory."""
    shutil.copytree(source, target)
    (target / name).unlink()
    os.mkfifo(target / name) if by == "fifo" else (target / name).mkdir()
    return target


@pytest.mark.parametrize("by", ["fifo", "directory"])
@pytest.mark.parametrize("name", [SINGLE_NAME, CONFIG_NAME])
def test_special_files_in_a_single_file_checkpoint(single: Path, tmp_path: Path, name: str, by: str) -> None:
    broken = replaced(single, tmp_path / "ckpt", name, by)
    kind = "a FIFO" if by == "fifo" else "a directory"
    error = ConfigError if name == CONFIG_NAME else CheckpointError
    refused_everywhere(broken, error, f"{broken / name}: is {kind}, not a regular file")


@pytest.mark.parametrize("by", ["fifo", "directory"])
def test_special_files_in_a_sharded_checkpoint(sharded: Path, tmp_path: Path, by: str) -> None:
    shard = sorted(sharded.glob("model-*.safetensors"))[1].name
    for name in (INDEX_NAME, shard):
        broken = replaced(sharded, tmp_path / f"{name}-{by}", name, by)
        refused_everywhere(broken, CheckpointError, f"{broken / name}: is a", "not a regular file")


def test_a_config_that_is_not_a_regular_file_is_refused_unopened(tmp_path: Path) -> None:
    fifo, folder = tmp_path / "fifo.json", tmp_path / "folder.json"
    os.mkfifo(fifo)
    folder.mkdir()
    with deadline():
        with pytest.raises(ConfigError, match="a FIFO, not a regular file"):
            MistralConfig.load(fifo)
    with pytest.raises(ConfigError, match="a directory, not a regular file"):
        MistralConfig.load(folder)
    with pytest.raises(ConfigError, match="missing"):
        MistralConfig.load(tmp_path / "absent.json")


def tied_with_copy(directory: Path, differs: bool) -> Path:
    """Tied embeddings whose file also stores lm_head (written by hand: kvlab's writer never does)."""
    config = MINI.replace(tie_word_embeddings=True)
    state = random_state_dict(config, seed=0)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    if differs:
        state["lm_head.weight"][0, 0] += 1
    directory.mkdir()
    save_file(state, directory / SINGLE_NAME, metadata={"format": "pt"})
    config.save(directory / CONFIG_NAME)
    return directory


def test_tied_copy_that_differs_fails_validation_as_it_fails_loading(tmp_path: Path) -> None:
    broken = tied_with_copy(tmp_path / "differs", differs=True)
    inspect_checkpoint(broken)  # the headers alone are fine: the difference is in the data
    refused_everywhere(broken, CheckpointError, "'lm_head.weight' differs from 'model.embed_tokens.weight'")


def test_what_loads_is_reported(single: Path, tmp_path: Path) -> None:
    report = validate_checkpoint(single)
    assert report.passed and report.clean and not report.findings and report.verdict.startswith("OK: ")
    assert report.details["tensors"] == 12 and report.details["dtype"] == "float32"
    assert report.details["bytes"] == sum(t.nbytes for t in random_state_dict(MINI).values())
    wrong = validate_checkpoint(single, expected_dtype="bfloat16")
    assert not wrong.passed and [f.check for f in wrong.findings] == ["dtype"] and wrong.verdict.startswith("FAIL")
    equal = validate_checkpoint(tied_with_copy(tmp_path / "equal", differs=False))
    assert equal.passed and not equal.clean and [(f.parameter, f.check) for f in equal.findings] == [
        ("lm_head.weight", "tied_copy_stored")]
    assert "[warning] tied_copy_stored: lm_head.weight" in equal.describe()
    load_model(tmp_path / "equal", "inference")  # and it loads
    with pytest.raises(ValueError, match="unknown dtype"):
        validate_checkpoint(single, expected_dtype="float8")
