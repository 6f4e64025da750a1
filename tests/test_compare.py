"""kvlab.study.sweeps (the cache-design sweeps on the tiny preset) and kvlab.study.results (the readers of
recorded results, among them the committed GPU runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from kvlab.caches import EXACT_CACHES, kv_bytes
from kvlab.config import preset
from kvlab.loaders import random_model
from kvlab.study.probes import prompt_ids
from kvlab.study.results import leak_vs_model, load_results, peak_breakdown, speed_summary
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
