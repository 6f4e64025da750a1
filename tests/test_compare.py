"""kvlab.study.sweeps (the cache-design sweeps on the tiny preset), kvlab.study.runs.measure with a cache
object, and kvlab.study.results (the readers of recorded results, among them the committed GPU runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from kvlab.caches import EXACT_CACHES, kv_bytes, make_cache
from kvlab.config import preset
from kvlab.loaders import random_model
from kvlab.study.probes import prompt_ids
from kvlab.study.results import (
    fast_summary,
    leak_vs_model,
    load_fast_kernels,
    load_fast_runs,
    load_results,
    peak_breakdown,
    speed_summary,
)
from kvlab.study.runs import measure
from kvlab.study.sweeps import ragged_batch, sweep_caches, time_caches, token_agreement, usable_caches

GPU_DATA = Path(__file__).resolve().parent.parent / "data" / "gpu"
CONFIG = preset("tiny", sliding_window=8)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_model(CONFIG, "inference")


def test_usable_caches_drops_sliding_without_a_window() -> None:
    assert "sliding" not in usable_caches(preset("tiny"))
    assert "sliding" in usable_caches(CONFIG)


def test_exact_caches_agree_with_the_no_cache_run(model: torch.nn.Module) -> None:
    table = token_agreement(model, prompt_ids(CONFIG.vocab_size, 4, batch=2), 12).set_index("cache")
    exact = [c for c in table.index if c in EXACT_CACHES]
    assert table.loc[exact, "tokens_equal"].all()
    assert (table.loc[exact, "max_abs_logit_error"] < 1e-4).all()
    assert 0 < table.loc["int8", "max_abs_logit_error"] < 0.05 * table.loc["int8", "max_abs_logit"]


def test_sweep_nbytes_equal_kv_bytes_and_gqa_reads_one_group(model: torch.nn.Module) -> None:
    sweep = sweep_caches(model, ["concat", "static", "gqa", "paged"], [1, 2], 10, prompt_len=4, trace=True)
    assert (sweep["nbytes"] == sweep["kv_bytes"]).all()
    assert sweep["peak_bytes"].notna().all() and (sweep["peak_bytes"] >= sweep["live_bytes"]).all()
    reads = sweep[sweep["step"] > 0].groupby("cache")["kv_read_bytes"].sum()
    assert reads["gqa"] * CONFIG.num_key_value_groups == reads["concat"]
    assert reads["static"] > reads["concat"]
    # the traced live bytes include the cache, built inside the traced region
    last = sweep[(sweep["step"] == 9) & (sweep["batch"] == 2)].set_index("cache")
    assert (last["live_bytes"] >= last["nbytes"]).all()


def test_time_caches_one_row_per_combination(model: torch.nn.Module) -> None:
    speed = time_caches(model, ["concat", "gqa"], [1, 2], [4, 8], steps=3, rounds=1)
    assert len(speed) == 2 * 2 * 2
    assert (speed["tokens_per_s"] > 0).all()
    with pytest.raises(ValueError):
        time_caches(model, ["concat"], [1], [4], steps=1)


def test_ragged_batch_paged_wastes_less_than_a_block_per_row(model: torch.nn.Module) -> None:
    prompts = [[1, 2, 3], list(range(1, 12)), [5]]
    table = ragged_batch(model, prompts, 4, ["static", "paged"], block_size=4).set_index("cache")
    assert table["tokens_equal"].all()
    assert (table["nbytes"] == table["kv_bytes"]).all()
    assert 0 <= table.loc["paged", "waste_bytes"] < len(prompts) * kv_bytes(CONFIG, 1, 4)
    assert table.loc["paged", "waste_bytes"] < table.loc["static", "waste_bytes"]


def _write_run(folder: Path, command: str = "python -m kvlab.experiments --out /somewhere/else --preset tiny") -> None:
    folder.mkdir(parents=True)
    config = preset("tiny").to_dict()
    (folder / "meta.json").write_text(json.dumps({"config": config, "command": command, "args": {"prompt_len": 1},
                                                  "device": {"type": "cpu"}}))
    steps = pd.DataFrame({"run_id": "leak:kvlab:float32:inference:concat:4", "step": range(4),
                          "generated": range(1, 5), "cache_len": range(1, 5),
                          "beyond_start_bytes": [kv_bytes(preset("tiny"), 1, n) for n in range(1, 5)]})
    steps.to_csv(folder / "steps.csv", index=False)
    pd.DataFrame([{"run_id": "leak:kvlab:float32:inference:concat:4", "suite": "leak", "loader": "inference",
                   "cache": "concat", "dtype": "float32", "status": "ok"}]).to_csv(folder / "runs.csv", index=False)


def test_load_results_reads_one_folder_or_a_folder_of_them(tmp_path: Path) -> None:
    _write_run(tmp_path / "a")
    _write_run(tmp_path / "b")
    both = load_results(tmp_path)
    assert both.sources == ["a", "b"] and len(both.runs) == 2 and set(both.runs["source"]) == {"a", "b"}
    one = load_results(tmp_path / "a")
    assert one.sources == ["."] and one.config == preset("tiny")
    assert "--out " + str((tmp_path / "a").resolve()) in one.commands()["."]
    table = leak_vs_model(one, "leak:kvlab:float32:inference:concat:4")
    assert (table["ratio"] == 1).all()  # the frozen loader holds exactly its KV cache
    with pytest.raises(KeyError):
        one.run("no such run")


def test_load_results_names_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no kvlab.experiments results"):
        load_results(tmp_path)


@pytest.mark.skipif(not GPU_DATA.is_dir(), reason="no recorded GPU results in data/gpu")
def test_recorded_gpu_results_agree_with_the_analytic_model() -> None:
    results = load_results(GPU_DATA)
    leaking = results.find_runs(suite="leak", loader="trainable", cache="concat")
    assert len(leaking)
    for run_id in leaking["run_id"]:
        assert leak_vs_model(results, run_id, points=6)["ratio"].between(0.9, 1.1).all()
    fixed = results.find_runs(suite="leak", loader="inference", cache="concat", dtype="bfloat16")["run_id"].iloc[0]
    assert abs(peak_breakdown(results, fixed)["peak_over_predicted"] - 1) < 0.01
    speed = speed_summary(results)
    assert set(speed["library"]) == {"kvlab", "transformers"} and speed["roofline_share"].between(0, 1).all()
    # The rerun commands point at the folders, relative to the repository root they are run from.
    for name, command in results.commands().items():
        assert f"--out data/gpu/{name}" in command, command


def test_measure_takes_a_cache_object_and_tells_its_phases(model: torch.nn.Module) -> None:
    phases: list[str] = []
    given = measure(model, make_cache("concat", CONFIG), 6, explain=True, phase=phases.append)
    named = measure(model, "concat", 6, explain=True)
    assert phases == ["decode", "explain"]
    assert given.cache == "concat" and given.kv_expected is None and named.kv_expected == named.kv_nbytes
    assert given.end_bytes == named.end_bytes and given.kv_nbytes == named.kv_nbytes
    assert torch.equal(given.generated, named.generated)
    assert given.retention is not None and given.retention.graph_nodes == named.retention.graph_nodes
    with pytest.raises(ValueError, match="cache name"):
        measure(model, make_cache("concat", CONFIG), 2, warmup=1)


GPU_FAST = GPU_DATA / "h200-fast"


@pytest.mark.skipif(not GPU_FAST.is_dir(), reason="no recorded fast-path runs in data/gpu/h200-fast")
def test_recorded_fast_runs_reproduce_the_benchmark_summary() -> None:
    fast = load_fast_runs(GPU_FAST)
    summary = fast_summary(fast)
    assert len(summary) >= 1 and (fast["repeats"] >= 1).all()
    for run, row in summary.iterrows():
        recorded = json.loads((GPU_FAST / str(run) / "fast.json").read_text())["summary"]
        assert row["roofline_bf16"] == pytest.approx(recorded["roofline_bf16_tok_per_s"])
        assert row["roofline_int8"] == pytest.approx(recorded["roofline_int8_tok_per_s"])
        for ours, theirs in (("bf16_share", "bf16_share_of_roofline"), ("int8_over_bf16", "int8_over_bf16"),
                             ("bf16_over_transformers", "bf16_over_hf_fastest")):
            assert [row[ours], row[f"{ours}_min"], row[f"{ours}_max"]] == pytest.approx(
                [recorded[theirs]["median"], recorded[theirs]["min"], recorded[theirs]["max"]])
        assert row["transformers"] == recorded["hf_fastest"]
    kvlab = fast[fast["library"] == "kvlab"]
    assert kvlab["tf_agreement"].between(0, 1).all() and (kvlab["roofline_share"] < 1).all()
    assert f"--out data/gpu/h200-fast/{fast['run'].iloc[0]}" in fast["command"].iloc[0]
    kernels = load_fast_kernels(GPU_FAST)
    assert {"matrix", "kernel", "us", "GBps", "run"} <= set(kernels.columns) and (kernels["GBps"] > 0).all()


def _write_fast_run(folder: Path, csv_speeds: list[float]) -> None:
    folder.mkdir(parents=True)
    meta = {"bandwidth": {"bandwidth_Bps": 1e12}, "paths": {"bf16": {
        "loader": "inference", "bytes_per_token": 1e10, "tok_per_s": {"runs": [50.0, 60.0, 70.0]},
        "teacher_forced": {"positions": 10, "argmax_equal": 9, "max_gap": 0.5, "max_gap_bf16_spacings": 2.0}}}}
    (folder / "fast.json").write_text(json.dumps(meta))
    pd.DataFrame({"path": "bf16", "repeat": range(len(csv_speeds)), "tok_per_s": csv_speeds}).to_csv(
        folder / "fast.csv", index=False)


def test_load_fast_runs_reads_the_repeats_and_refuses_a_mismatch(tmp_path: Path) -> None:
    _write_fast_run(tmp_path / "good", [70.0, 50.0, 60.0])
    row = load_fast_runs(tmp_path / "good").iloc[0]
    assert (row["tok_per_s"], row["tok_per_s_min"], row["tok_per_s_max"]) == (60.0, 50.0, 70.0)
    assert row["roofline_tok_per_s"] == 100.0 and row["roofline_share"] == 0.6 and row["tf_agreement"] == 0.9
    _write_fast_run(tmp_path / "bad", [50.0, 60.0, 71.0])
    with pytest.raises(ValueError, match="bad: fast.csv's bf16 repeats"):
        load_fast_runs(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="no fast-path results"):
        load_fast_runs(tmp_path / "good" / "missing")
