"""The kvlab command: help everywhere, exit codes scripts can trust, files that say how they were made."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from kvlab.cli import main

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ["build-checkpoint", "validate", "reproduce", "report", "demo"]


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


def test_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["demo", "--tokens", "8", "--loaders", "trainable,inference", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "LEAK" in out and " ok " in out
    assert exit_code(["demo", "--loaders", "bogus"]) == 2


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("bench_cache_change", ROOT / "benchmarks" / "bench_cache_change.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cache_benchmark_baseline_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    baseline = tmp_path / "base.json"
    small = ["--caches", "concat,static", "--tokens", "6", "--prompt-len", "4", "--repeats", "1"]
    assert bench.main(["--save-baseline", str(baseline), *small]) == 0
    saved = json.loads(baseline.read_text())
    assert set(saved["results"]) == {"concat", "static"} and saved["meta"]["tokens"] == 6
    # Same code: memory and tokens are identical; speed within a generous tolerance (busy test machines).
    assert bench.main(["--baseline", str(baseline), *small, "--tolerance", "0.95"]) == 0
    assert "ok" in capsys.readouterr().out
    saved["results"]["concat"]["tokens_per_s"] *= 1000  # pretend the baseline was far faster
    saved["results"]["static"]["peak_bytes"] //= 2  # and used half the memory
    baseline.write_text(json.dumps(saved))
    assert bench.main(["--baseline", str(baseline), *small, "--tolerance", "0.5"]) == 1
    table = capsys.readouterr().out
    assert "SLOWER" in table and "MORE MEMORY" in table
    baseline.write_text("{not json")
    assert bench.main(["--baseline", str(baseline), *small]) == 2
