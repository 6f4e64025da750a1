"""The real-scale experiment runner, exercised at tiny scale on the CPU (CI) and, where present, on CUDA."""

import json

import pandas as pd
import pytest
import torch

from kvlab.caches import ConcatCache
from kvlab.config import preset
from kvlab.experiments.command import main, run_experiments
from kvlab.fastpath import FastDecoder, fast_cache
from kvlab.generate import generate
from kvlab.loaders import random_model
from kvlab.study.runs import measure
from kvlab.synthetic import random_state_dict

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    meta = run_experiments(["--preset", "tiny", "--device", "cpu", "--tokens", "32", "--out", str(out),
                            "--no-progress", "--suites", "compare,leak,incident", "--caches", "concat",
                            "--incident-tokens", "16"])
    return out, meta


def test_files_and_columns(cpu_run) -> None:
    out, meta = cpu_run
    steps, runs = pd.read_csv(out / "steps.csv"), pd.read_csv(out / "runs.csv")
    stored = json.loads((out / "meta.json").read_text())
    for column in ("run_id", "loader", "cache", "dtype", "step", "generated", "step_s", "beyond_start_bytes",
                   "live_bytes", "live_repeat_kv", "live_cache", "kv_bytes"):
        assert column in steps.columns, column
    assert {"status", "tokens_done", "tok_per_s", "peak_bytes", "final_beyond_start"} <= set(runs.columns)
    assert stored["torch"] == torch.__version__ and stored["preset"] == "tiny"
    assert stored["command"].startswith("python -m kvlab.experiments")
    assert stored["config"]["hidden_size"] == preset("tiny").hidden_size
    assert not stored.get("suite_errors"), stored.get("suite_errors")
    assert (runs["status"] == "ok").all()
    # One row per run x step: every leak run decoded every token.
    leak = steps[steps["suite"] == "leak"]
    assert leak.groupby("run_id")["step"].apply(lambda s: list(s) == list(range(32))).all()


def test_trainable_retains_memory_and_the_fix_does_not(cpu_run) -> None:
    out, _ = cpu_run
    runs = pd.read_csv(out / "runs.csv").set_index("run_id")
    end = runs["final_beyond_start"]
    trainable = end["leak:kvlab:float32:trainable:concat:32"]
    inference = end["leak:kvlab:float32:inference:concat:32"]
    int8 = end["leak:kvlab:float32:int8:concat:32"]
    kv = runs.loc["leak:kvlab:float32:inference:concat:32", "kv_bytes_end"]
    assert trainable > 20 * inference
    assert inference <= 1.1 * kv + 65536 and int8 <= 1.1 * kv + 65536  # the cache, plus at most a token or two
    # Faster than linear: the second half of the run added more than the first half (quadratic growth
    # on top of a per-token constant that dominates at this tiny scale).
    steps = pd.read_csv(out / "steps.csv")
    leak = steps[steps["run_id"] == "leak:kvlab:float32:trainable:concat:32"].set_index("generated")
    first = leak.loc[16, "beyond_start_bytes"]
    second = leak.loc[32, "beyond_start_bytes"] - first
    assert second > 1.25 * first


def test_a_recorded_run_is_the_studys_measured_run(cpu_run) -> None:
    """The suites record :func:`kvlab.study.runs.measure`: the same prompt, the same bytes, the same tokens."""
    out, _ = cpu_run
    steps = pd.read_csv(out / "steps.csv")
    recorded = steps[steps["run_id"] == "leak:kvlab:float32:trainable:concat:32"].set_index("step")
    run = measure(random_model("tiny", "trainable"), "concat", 32, prompt_len=8)
    assert (recorded["live_bytes"] == run.timeline.set_index("step")["live_bytes"]).all()
    assert (recorded["kv_bytes"] == run.timeline.set_index("step")["cache_bytes"]).all()


def test_a_capped_run_keeps_its_steps(tmp_path) -> None:
    """A run past --run-cap-s ends as "capped" with every step it made recorded; the session goes on."""
    meta = run_experiments(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--no-progress",
                            "--suites", "leak", "--runs", "float32:inference:concat:100000",
                            "float32:inference:concat:8", "--run-cap-s", "1"])
    assert not meta.get("suite_errors")
    runs = pd.read_csv(tmp_path / "runs.csv").set_index("run_id")
    capped = runs.loc["leak:kvlab:float32:inference:concat:100000"]
    assert capped["status"] == "capped" and 0 < capped["tokens_done"] < 100000
    steps = pd.read_csv(tmp_path / "steps.csv")
    assert (steps["run_id"] == capped.name).sum() == capped["tokens_done"]
    assert runs.loc["leak:kvlab:float32:inference:concat:8", "status"] == "ok"


@pytest.mark.parametrize("argv", [["--suites", "nope"], ["--runs", "float32:trainable"], ["--loaders", "x"],
                                  ["--summarize", "no-such-folder"], ["--tokens", "0"],
                                  ["--device", "bogus"]])
def test_bad_options_are_one_line_exit_two(argv: list[str], tmp_path, capsys) -> None:
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m kvlab.experiments: error:"), err
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_incident_table_by_site(cpu_run) -> None:
    out, _ = cpu_run
    table = pd.read_csv(out / "incident.csv")
    ours = table[table["source"].str.startswith("kvlab")].set_index("run")
    trainable = ours.loc["incident:kvlab:float32:trainable:concat:16:traced"]
    inference = ours.loc["incident:kvlab:float32:inference:concat:16:traced"]
    assert trainable["repeat_kv_GB"] > 0 and trainable["total_GB"] > 10 * inference["total_GB"]
    assert not inference["repeat_kv_GB"] > 0  # nothing from repeat_kv outlives its step


def test_summary_matches_the_analytic_leak_model(cpu_run, tmp_path) -> None:
    out, _ = cpu_run
    summary = run_experiments(["--summarize", str(out), "--out", str(tmp_path)])
    vs_model = pd.read_csv(tmp_path / "leak_vs_model.csv")
    trainable = vs_model[vs_model["run_id"] == "leak:kvlab:float32:trainable:concat:32"]
    assert list(trainable["generated"]) == [16, 32]
    assert trainable["measured_over_model"].between(0.9, 1.1).all(), trainable
    by_site = pd.read_csv(tmp_path / "incident_by_site.csv").set_index("site")
    assert by_site.loc["repeat_kv", "measured_GB"] == pytest.approx(by_site.loc["repeat_kv", "model_leak_GB"])
    fixed = {row["run_id"]: row for row in summary["fixed_peak_check"]}
    assert fixed == {}  # CUDA only: a CPU run has no allocator peak


def test_random_weights_scale() -> None:
    config = preset("tiny")
    state = random_state_dict(config, 3, device="cpu", dtype=torch.float32)
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std().item() - config.hidden_size ** -0.5) < 0.1 * config.hidden_size ** -0.5
    assert torch.equal(state["model.norm.weight"], torch.ones(config.hidden_size))
    assert torch.equal(q, random_state_dict(config, 3, device="cpu", dtype=torch.float32)[
        "model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("grouped", [True, False])
def test_fast_path_traces_as_one_graph_and_matches_eager(grouped: bool) -> None:
    """fullgraph=True fails on any graph break, so this also checks that record_function regions trace."""
    config = preset("tiny")
    model = random_model(config, "inference")
    prompt = torch.tensor([[5, 6, 7]])
    expected = generate(model, prompt, 20, cache=ConcatCache(config.num_hidden_layers)).tokens
    torch._dynamo.reset()
    fast = FastDecoder(model, 32, grouped=grouped, compile=True, backend="eager")
    assert torch.equal(fast.generate(prompt, 20, warmup=2).tokens, expected)
    torch._dynamo.reset()


def test_static_cache_is_a_drop_in_for_generate() -> None:
    config = preset("tiny")
    model = random_model(config, "inference")
    prompt = torch.tensor([[1, 2, 3, 4]])
    cache = fast_cache(config, 1, 40, grouped=True)
    tokens = generate(model, prompt, 30, cache=cache).tokens
    assert torch.equal(tokens, generate(model, prompt, 30, cache=ConcatCache(config.num_hidden_layers)).tokens)
    assert cache.seq_len == 4 + 29 and cache.nbytes == 2 * 4 * 2 * 40 * 32 * 4


def test_transformers_side_by_side(tmp_path) -> None:
    pytest.importorskip("transformers")
    meta = run_experiments(["--preset", "tiny", "--device", "cpu", "--tokens", "16", "--out", str(tmp_path),
                            "--no-progress", "--suites", "parity,hf", "--hf-leak-points", "8,16", "--no-hf-generate"])
    assert not meta.get("suite_errors"), meta.get("suite_errors")
    eager = next(p for p in meta["hf_parity"] if p["hf_attn"] == "eager")
    assert eager["max_abs_logit_diff"] < 1e-4 and eager["argmax_agreement"] == 1.0
    leak = meta["hf_leak_GiB_beyond_start"]
    assert leak["hf-grad"]["16"] > leak["hf-grad"]["8"] > 0
    assert leak["hf-grad"]["16"] > 10 * leak["hf-nograd"]["16"]
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert set(runs["cache"]) == {"DynamicCache", "StaticCache"}


@cuda
def test_cuda_smoke(tmp_path) -> None:
    meta = run_experiments(["--preset", "tiny", "--device", "cuda", "--tokens", "32", "--out", str(tmp_path),
                            "--no-progress", "--suites", "bandwidth,leak", "--caches", "concat", "--copy-gib", "0.25"])
    assert meta["bandwidth"]["bandwidth_Bps"] > 1e10
    runs = pd.read_csv(tmp_path / "runs.csv").set_index("loader")
    assert runs.loc["trainable", "final_beyond_start"] > runs.loc["inference", "final_beyond_start"]
    assert (pd.read_csv(tmp_path / "steps.csv")["cuda_allocated"] > 0).all()
