"""kvlab diagnose on loops and models kvlab did not write: the verdict, its cause, the fix, bad input.

The leaky and fixed servers of ``examples/`` are hand-written in plain PyTorch; the transformers models
are built from tiny random configs and saved with ``save_pretrained``, then loaded by ``--hf`` exactly
as a user's checkpoint would be; the other loops come from ``foreign_models``. Every figure asserted is
measured here or by the diagnosis, and the cache's own bytes are counted independently of it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from foreign_models import HF_ARCHS, TinyLM, decode, hf_model

from kvlab.diagnose import Diagnosis, diagnose, hf_target, load_target, main

ROOT = Path(__file__).resolve().parent.parent
LEAKY, FIXED = "examples/leaky_server.py:run", "examples/fixed_server.py:run"
QUIET = ["--no-html", "--quiet"]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the targets are written relative to the repository, as the README shows them


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # what setup printed (transformers' progress bars) is not the command's output
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``: what they really hold."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.fixture(scope="module")
def leaky_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, str, Path]:
    """``kvlab diagnose`` on the leaky example with its HTML report, run once for the two tests that read it
    (the diagnosis written is the same with or without ``--no-html``): exit code, stdout, stderr, folder."""
    out, stdout, stderr = tmp_path_factory.mktemp("leaky"), io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        patch.chdir(ROOT)  # the target is written relative to the repository, as the README shows it
        code = main([LEAKY, "--tokens", "32", "--out", str(out), "--quiet"])
    return code, stdout.getvalue(), stderr.getvalue(), out


# --------------------------------------------------------------------------------------------- examples
def test_leaky_example_leaks_through_its_graph_and_the_fix_leaves_the_cache(leaky_report) -> None:
    code, out, err, folder = leaky_report
    assert code == 1, err
    assert out.startswith("LEAK:") and "parameters requiring grad" in out and not err
    d = Diagnosis.load(folder)
    example = load_target(LEAKY).run.__globals__  # the example's constants and model
    kv_per_token = 2 * example["LAYERS"] * example["KV_HEADS"] * example["HEAD_DIM"] * 4  # K and V, float32
    last = d.kept.iloc[-1]
    assert list(d.kept["tokens"]) == [4, 8, 16, 32]
    assert last.cache_bytes == kv_per_token * 32
    assert last.saved_bytes > 10 * last.cache_bytes  # the graph, not the cache, is what is kept
    assert d.growth["slope"] > 1.2  # on its way to quadratic
    assert d.sites.iloc[0]["site"] == "repeat_kv"  # the example's record_function region holds most at the end
    assert (d.validation["check"] == "requires_grad").sum() == sum(1 for _ in example["model"].parameters())
    fix = d.fix.set_index("variant")
    assert (fix["verdict"] == "ok").all() and (fix["saved_bytes"] == 0).all()
    assert (fix["total_bytes"] == kv_per_token * 32).all()  # what remains is exactly the cache
    assert "What remains is the cache" in d.fix_summary


def test_fixed_example_keeps_only_its_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli([FIXED, "--tokens", "32", "--out", str(tmp_path), *QUIET], capsys)
    assert code == 0, err
    d = Diagnosis.load(tmp_path)
    assert out.startswith("No leak:") and d.causes == []
    assert (d.kept["total_bytes"] == d.kept["cache_bytes"]).all() and (d.kept["saved_bytes"] == 0).all()
    assert abs(d.growth["slope"] - 1) < 0.02  # a KV cache grows linearly
    assert d.validation.empty  # frozen weights: nothing to report
    written = json.loads((tmp_path / "diagnosis.json").read_text())
    assert written["verdict"] == "ok" and set(written["tables"]) >= {"kept", "sites", "fix", "validation"}


# --------------------------------------------------------------------------------------------- transformers
HF_CASES = [(arch, {}) for arch in HF_ARCHS] + [("mistral", {"sliding_window": 8})]


@pytest.mark.parametrize(("arch", "overrides"), HF_CASES, ids=[a + ("-sliding" if o else "") for a, o in HF_CASES])
def test_hf_checkpoint_leak_is_named_and_the_fix_keeps_the_cache(arch: str, overrides: dict, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    checkpoint, out, tokens = tmp_path / "checkpoint", tmp_path / "diagnosis", 16
    hf_model(arch, **overrides).save_pretrained(checkpoint)
    code, stdout, err = run_cli(["--hf", str(checkpoint), "--tokens", str(tokens), "--out", str(out), *QUIET], capsys)
    assert code == 1, err
    d = Diagnosis.load(out)
    assert d.causes[0].startswith("parameters requiring grad:"), d.causes
    assert d.kept["saved_bytes"].iloc[-1] > d.kept["cache_bytes"].iloc[-1]

    # The cache's own bytes, counted here from the model's cache object, not by the diagnosis: its layers'
    # K/V and any other tensor they hold (a sliding-window layer keeps its window size as a tensor).
    target = hf_target(checkpoint)
    with torch.inference_mode():
        cache = target.run(tokens)
    own = storage_bytes([t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)])
    fix = d.fix.set_index("variant")
    assert (fix["total_bytes"] == own).all() and (fix["saved_bytes"] == 0).all() and (fix["verdict"] == "ok").all()

    modules = {name for name, _ in target.modules["model"].named_modules() if name}
    top = d.sites.head(5)["site"].tolist()
    assert any(site in modules for site in top), top  # attributed to the model's own module paths
    params = sum(1 for _ in target.modules["model"].parameters())
    assert (d.validation["check"] == "requires_grad").sum() >= params


# --------------------------------------------------------------------------------------------- other loops
def test_a_returned_list_of_logits_is_the_leak_not_the_cache() -> None:
    """The cache is detached (the usual first "fix"), but every step's logits are kept, each with its graph."""
    model = TinyLM(vocab=2048)
    d = diagnose(functools.partial(decode, model, detach=True, keep_logits=True), 32)
    assert d.verdict == "LEAK"
    parts = d.parts.set_index("part")
    assert parts.loc["kept[0]", "cache_bytes"] > 0 and parts.loc["kept[0]", "graph_nodes"] == 0  # a clean cache
    logits = parts.loc["kept[2]"]
    assert logits["kind"] == "list of 32 tensors (1, 2048) float32" and logits["cache_bytes"] == 0
    assert logits["other_bytes"] == 32 * 2048 * 4 and logits["saved_bytes"] > logits["other_bytes"]
    labels = [c.split(":")[0] for c in d.causes]
    assert labels == ["parameters requiring grad", "an autograd graph kept alive", "kept[2] growing outside the cache"]
    assert "kept[2] (list of 32 tensors (1, 2048) float32) carries" in d.causes[1] and "not the cache" in d.causes[1]
    fix = d.fix.set_index("variant")
    assert (fix["verdict"] == "ok").all() and (fix["saved_bytes"] == 0).all()  # without graphs the list is state
    assert (fix["beyond_cache_bytes"] == logits["other_bytes"] + parts.loc["kept[1]", "other_bytes"]).all()
    assert "kept[2]" in d.fix_summary and "No autograd graph remains" in d.fix_summary


@pytest.mark.parametrize("store", ["dict", "list", "ledger"])
def test_a_clean_loop_whose_cache_grows_passes(store: str) -> None:
    model = TinyLM()
    d = diagnose(functools.partial(decode, model, grad=False, store=store), 32)
    assert d.verdict == "ok" and d.causes == []
    assert d.kept["saved_bytes"].eq(0).all()
    cache = d.kept["cache_bytes"]
    assert cache.iloc[-1] > cache.iloc[0]  # the cache grows, and that is fine


def test_a_loop_without_modules_found_still_gets_the_inference_mode_check() -> None:
    def run(steps: int) -> list[torch.Tensor]:
        weight = torch.randn(8, 8, requires_grad=True)  # made inside: nothing to find, nothing to freeze
        state, kept = torch.zeros(1, 8), []
        for _ in range(steps):
            state = torch.tanh(state @ weight)
            kept.append(state)
        return kept

    d = diagnose(run, 8)
    assert d.verdict == "LEAK" and list(d.fix["variant"]) == ["inference_mode"]
    assert "No torch.nn.Module was found" in d.fix_summary


# --------------------------------------------------------------------------------------------- bad input
def _write(tmp_path: Path, source: str) -> str:
    path = tmp_path / "loop.py"
    path.write_text(source)
    return str(path)


BAD_TARGETS = {
    "no such file": lambda tmp: ["missing.py:run"],
    "no attribute": lambda tmp: ["examples/leaky_server.py:nope"],
    "is int": lambda tmp: ["examples/leaky_server.py:VOCAB"],
    "is a class": lambda tmp: ["examples/leaky_server.py:TinyDecoder"],
    "cannot import module": lambda tmp: ["no_such_package.loop:run"],
    "expected path/to/file.py:function": lambda tmp: ["examples/leaky_server.py"],
    "SyntaxError": lambda tmp: [_write(tmp, "def run(steps):\n    return (\n") + ":run"],
    "RuntimeError: no GPU here": lambda tmp: [_write(tmp, "raise RuntimeError('no GPU here')\n") + ":run"],
    "returned int, which holds no tensors": lambda tmp: [_write(tmp, "def run(steps):\n    return steps\n") + ":run"],
    "returned NoneType": lambda tmp: [_write(tmp, "def run(steps):\n    pass\n") + ":run"],
    "raised ValueError: boom": lambda tmp: [_write(tmp, "def run(steps):\n    raise ValueError('boom')\n") + ":run"],
    "raised TypeError": lambda tmp: [_write(tmp, "def run():\n    pass\n") + ":run"],
    "no such checkpoint directory": lambda tmp: ["--hf", str(tmp / "missing")],
    "not a directory": lambda tmp: ["--hf", _write(tmp, "")],
    "no config.json": lambda tmp: ["--hf", str(tmp)],
    "must be at least 4": lambda tmp: [LEAKY, "--tokens", "2"],
    "either TARGET": lambda tmp: [],
    "cannot create it": lambda tmp: [LEAKY, "--out", _write(tmp, "") + "/sub"],
}


@pytest.mark.parametrize("message", list(BAD_TARGETS))
def test_bad_input_exits_two_with_one_line(message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = BAD_TARGETS[message](tmp_path)
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "out"), *QUIET] if "--out" not in argv else
                             [*argv, *QUIET], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("kvlab diagnose: error:") and message in err, err
    assert "Traceback" not in err and out == ""


def _checkpoint(tmp_path: Path) -> Path:
    pytest.importorskip("transformers")
    directory = tmp_path / "checkpoint"
    hf_model("llama").save_pretrained(directory)
    return directory


@pytest.mark.parametrize("damage", ["config", "weights", "pickled only"])
def test_a_corrupt_checkpoint_exits_two(damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = _checkpoint(tmp_path)
    weights = directory / "model.safetensors"
    if damage == "config":
        (directory / "config.json").write_text("{not json")
    elif damage == "weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.rename(directory / "pytorch_model.bin")
    code, out, err = run_cli(["--hf", str(directory), "--out", str(tmp_path / "out"), *QUIET], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert {"config": "corrupt config.json", "weights": "transformers cannot load it",
            "pickled only": "never loaded"}[damage] in err


def test_hf_without_transformers_says_how_to_install(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _checkpoint(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    code, out, err = run_cli(["--hf", str(directory), "--out", str(tmp_path / "out"), *QUIET], capsys)
    assert code == 2 and "pip install 'kvlab[hf]'" in err and err.count("\n") == 1


def test_the_command_exits_two_without_traceback_in_a_fresh_process(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "kvlab", "diagnose", "missing.py:run", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no such file" in done.stderr


def test_load_target_finds_the_model_of_the_file() -> None:
    target = load_target(LEAKY)
    assert list(target.modules) == ["model"] and target.takes_device


# --------------------------------------------------------------------------------------------- the report
@pytest.mark.slow
def test_the_report_renders_for_a_leak(leaky_report) -> None:
    code, out, err, folder = leaky_report
    assert code == 1
    page = folder / "08_diagnose.html"
    assert f"report: {page}" in out
    html = page.read_text()
    assert "LEAK: the loop keeps" in html and "Traceback" not in html and "AssertionError" not in html
