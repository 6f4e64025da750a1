"""kvlab demo: the leak against the fix, per loader, in seconds; its figures are the README's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvlab.caches import kv_bytes
from kvlab.cli import main
from kvlab.config import preset
from kvlab.demo import expected_contrast, run_demo
from kvlab.memory.units import MiB
from kvlab.study.memmodel import leak_bytes

README = Path(__file__).resolve().parent.parent / "README.md"
TOKENS = 256  # the README's table: 256 tokens from a one-token prompt, kept after 128 and 256

pytestmark = pytest.mark.usefixtures("isolated")  # conftest: temporary data folder, one thread


@pytest.fixture(scope="module")
def table():
    return run_demo(tokens=TOKENS, loaders=["trainable", "inference"], progress=False).set_index("loader")


def test_kept_bytes_are_the_cache_plus_the_analytic_leak(table) -> None:
    """The fixed loader keeps its KV cache and the last step's outputs; the leaking loader keeps exactly that
    plus what the analytic model says autograd saves (kvlab.study.memmodel.leak_bytes)."""
    config = preset("tiny")
    for n in (TOKENS // 2, TOKENS):
        kept = table[f"retained MiB @{n}"] * MiB
        assert table.loc["inference", "KV cache MiB"] * MiB == kv_bytes(config, 1, TOKENS)
        assert 0 <= kept["inference"] - kv_bytes(config, 1, n) < 16 * 1024  # the last logits and token
        assert kept["trainable"] - leak_bytes(config, n) == kept["inference"]
    assert table.loc["trainable", "verdict"] == "LEAK" and table.loc["inference", "verdict"] == "ok"
    assert table.loc["trainable", "growth ratio"] > 3.5 and table.loc["inference", "growth ratio"] < 2.05
    assert expected_contrast(table.reset_index())


def test_readme_quotes_these_figures(table) -> None:
    """The README's table of kept bytes is this measurement (rounded as it prints them)."""
    text = README.read_text()
    for loader in ("trainable", "inference"):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{loader}`"))
        low, high = (float(x) for x in re.search(r"([\d.]+) / ([\d.]+) MiB", row).groups())
        digits = 1 if loader == "trainable" else 2
        assert round(table.loc[loader, f"retained MiB @{TOKENS // 2}"], digits) == low, row
        assert round(table.loc[loader, f"retained MiB @{TOKENS}"], digits) == high, row
        assert f"x{table.loc[loader, 'growth ratio']:.2f}" in row, row


def test_demo_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--tokens", "8", "--loaders", "trainable,inference", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "LEAK" in out and " ok " in out


@pytest.mark.parametrize("argv", [["--loaders", "bogus"], ["--preset", "huge"], ["--cache", "nope"],
                                  ["--tokens", "1"], ["--threads", "-1"]])
def test_demo_bad_input_is_one_line_exit_two(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *argv]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("kvlab demo: error:")
    assert captured.out == ""
