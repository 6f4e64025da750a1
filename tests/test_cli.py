"""The kvlab command: help everywhere, exit codes scripts can trust, files that say how they were made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from kvlab.cli import main
from kvlab.config import preset
from kvlab.errors import CheckpointError
from kvlab.loaders import load_model
from kvlab.study import cachecheck
from kvlab.synthetic import random_state_dict

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ["build-checkpoint", "validate", "reproduce", "report", "demo", "diagnose"]


pytestmark = pytest.mark.usefixtures("isolated")  # conftest: temporary data folder, one thread


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse: --help exits 0, usage errors exit 2
        return int(exc.code or 0)


@pytest.mark.parametrize("command", [[], *([c] for c in SUBCOMMANDS)])
def test_help_exits_zero(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code([*command, "--help"]) == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_module_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "kvlab", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0
    assert all(c in done.stdout for c in SUBCOMMANDS)


def test_usage_errors_exit_two(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code([]) == 2
    assert exit_code(["no-such-command"]) == 2
    assert exit_code(["reproduce", "--tokens", "many"]) == 2
    assert exit_code(["reproduce", "--tokens", "1"]) == 2
    assert exit_code(["build-checkpoint", "--preset", "huge"]) == 2
    assert "--preset 'huge'" in capsys.readouterr().err


def test_build_and_validate_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "tiny"
    assert exit_code(["build-checkpoint", "--preset", "tiny", "--seed", "1", "--out", str(target),
                      "--shard-bytes", "4000000"]) == 0
    assert Path(capsys.readouterr().out.strip()) == target
    assert len(list(target.glob("model-*.safetensors"))) > 1
    assert exit_code(["validate", str(target)]) == 0
    assert exit_code(["validate", str(target), "--loader", "inference"]) == 0
    assert capsys.readouterr().out.count("OK:") == 3
    assert exit_code(["validate", str(target), "--loader", "trainable"]) == 1
    captured = capsys.readouterr()
    assert "requires_grad" in captured.out and "check failed" in captured.err
    assert exit_code(["validate", str(target), "--expected-dtype", "bfloat16"]) == 1
    assert exit_code(["validate", str(target), "--expected-dtype", "float33"]) == 2


def test_validate_bad_input_exits_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "tiny"
    assert exit_code(["build-checkpoint", "--out", str(target)]) == 0
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    assert exit_code(["validate", str(target)]) == 2
    err = capsys.readouterr().err
    assert "invalid checkpoint" in err and "model.safetensors" in err
    assert exit_code(["validate", str(tmp_path / "missing")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single line a command printed on stderr for bad input (and no traceback anywhere)."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    return lines[0]


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path / "a-file"


@pytest.mark.parametrize("command", [["build-checkpoint", "--out"], ["reproduce", "--tokens", "4", "--quiet", "--out"]])
def test_unwritable_out_is_one_line_exit_two(command: list[str], a_file: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for out in (a_file / "sub", Path("/proc") / "kvlab-test" / "out"):
        assert exit_code([*command, str(out)]) == 2
        line = one_error_line(capsys)
        assert line.startswith(f"kvlab {command[0]}: ") and line.count(str(out)) == 1, line


def test_report_of_a_missing_notebook_is_one_line_exit_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.ipynb"
    assert exit_code(["report", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert one_error_line(capsys).count(str(missing)) == 1


def test_bad_values_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "tiny"
    assert exit_code(["build-checkpoint", "--out", str(target)]) == 0
    capsys.readouterr()
    for argv, option in ((["validate", str(target), "--limit", "-5"], "--limit"),
                         (["reproduce", "--prompt-len", "0"], "--prompt-len"),
                         (["reproduce", "--seed", "-1"], "--seed"),
                         (["reproduce", "--threads", "0"], "--threads"),
                         (["build-checkpoint", "--shard-bytes", "0", "--out", str(tmp_path / "x")], "--shard-bytes"),
                         (["validate", str(target), "--loader", "inference", "--device", "nope"], "--device"),
                         (["validate", str(target), "--loader", "inference", "--device", "cuda:7"], "--device")):
        assert exit_code(argv) == 2, argv
        assert option in one_error_line(capsys)  # and nothing on stdout: no "OK" before the refusal


def test_existing_checkpoint_asks_for_the_overwrite_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "tiny"
    assert exit_code(["build-checkpoint", "--out", str(target)]) == 0
    capsys.readouterr()
    assert exit_code(["build-checkpoint", "--out", str(target)]) == 2
    line = one_error_line(capsys)
    assert "--overwrite" in line and "overwrite=True" not in line and line.count(str(target)) == 1
    assert exit_code(["build-checkpoint", "--out", str(target), "--seed", "1", "--overwrite"]) == 0


def test_config_json_that_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "tiny"
    assert exit_code(["build-checkpoint", "--out", str(target)]) == 0
    (target / "config.json").unlink()
    (target / "config.json").mkdir()
    capsys.readouterr()
    for argv in (["validate", str(target)], ["reproduce", "--checkpoint", str(target), "--tokens", "4", "--quiet",
                                             "--out", str(tmp_path / "out")]):
        assert exit_code(argv) == 2
        line = one_error_line(capsys)
        assert "directory" in line and "missing" not in line and line.count(str(target / "config.json")) == 1, line


def test_validate_checks_what_loading_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tied checkpoint that also stores a *different* lm_head: loading refuses it, so validation must."""
    config = preset("tiny").replace(tie_word_embeddings=True)
    state = random_state_dict(config)
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1
    target = tmp_path / "tied"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(config.to_dict()))
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head"):
        load_model(target, "inference")
    assert exit_code(["validate", str(target)]) != 0
    captured = capsys.readouterr()
    assert "lm_head" in captured.err and "OK" not in captured.out


def test_reproduce_writes_csv_png_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokens = 12
    assert exit_code(["reproduce", "--preset", "tiny", "--loader", "trainable", "--cache", "concat",
                      "--tokens", str(tokens), "--out", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("LEAK")
    stem = tmp_path / f"reproduce-tiny-trainable-concat-{tokens}"
    frame = pd.read_csv(stem.with_suffix(".csv"))
    assert list(frame["step"]) == list(range(tokens))
    assert (frame["cache_bytes"] == frame["kv_analytic_bytes"]).all()
    assert frame["live_bytes"].is_monotonic_increasing
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["verdict"] == "LEAK" and len(meta["generated_tokens"]) == tokens
    assert meta["rerun"].startswith("kvlab reproduce --preset tiny --loader trainable --cache concat")
    assert exit_code(["reproduce", "--loader", "trainable", "--tokens", "4", "--out", str(tmp_path),
                      "--quiet", "--fail-on-leak"]) == 1
    assert exit_code(["reproduce", "--loader", "inference", "--tokens", "4", "--out", str(tmp_path),
                      "--quiet", "--fail-on-leak"]) == 0
    assert exit_code(["reproduce", "--cache", "nope", "--tokens", "4", "--out", str(tmp_path), "--quiet"]) == 2


def test_reproduce_on_cuda_skips_cleanly_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: nothing to refuse")
    assert exit_code(["reproduce", "--device", "cuda", "--tokens", "4", "--out", str(tmp_path), "--quiet"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_cache_benchmark_baseline_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    baseline = tmp_path / "base.json"
    small = ["--caches", "concat,static", "--tokens", "6", "--prompt-len", "4", "--repeats", "1"]
    assert cachecheck.main(["--save-baseline", str(baseline), *small]) == 0
    saved = json.loads(baseline.read_text())
    assert set(saved["results"]) == {"concat", "static"} and saved["meta"]["tokens"] == 6
    # Same code: memory and tokens are identical; speed within a generous tolerance (busy test machines).
    assert cachecheck.main(["--baseline", str(baseline), *small, "--tolerance", "0.95"]) == 0
    assert "ok" in capsys.readouterr().out
    saved["results"]["concat"]["tokens_per_s"] *= 1000  # pretend the baseline was far faster
    saved["results"]["static"]["peak_bytes"] //= 2  # and used half the memory
    baseline.write_text(json.dumps(saved))
    assert cachecheck.main(["--baseline", str(baseline), *small, "--tolerance", "0.5"]) == 1
    table = capsys.readouterr().out
    assert "SLOWER" in table and "MORE MEMORY" in table
    baseline.write_text("{not json")
    assert cachecheck.main(["--baseline", str(baseline), *small]) == 2


def test_benchmark_scripts_run_the_study_entry_points() -> None:
    """The benchmark script is the same command as the study's module (no code of its own to drift)."""
    for module in ("kvlab.study.cachecheck", None):
        argv = ["-m", module] if module else [str(ROOT / "benchmarks" / "bench_cache_change.py")]
        done = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0 and "--save-baseline" in done.stdout, done.stderr
