"""``kvlab reproduce``: one measured decode run written to disk as CSV, PNG and JSON.

The run is :func:`kvlab.study.runs.measure` with every CPU probe on (exact tracer, RSS, the kept bytes
after N/2 and N tokens and the leak guard's verdict on them; CUDA's counters on a GPU). The JSON holds
what is needed to rerun it: the exact command, seeds, prompt, config, environment and a hash of the
generated tokens, so that a second run can be checked token for token and byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kvlab.loaders import load_model
from kvlab.memory.units import MiB
from kvlab.synthetic import build_checkpoint

from .env import cleanup
from .records import environment, jsonable, now_utc, write_json
from .runs import DecodeRun, measure

__all__ = ["Reproduction", "reproduce"]


@dataclass
class Reproduction:
    """What :func:`reproduce` wrote and found."""

    csv: Path
    png: Path
    json: Path
    tokens: list[int]
    leak: bool
    meta: dict[str, Any]
    run: DecodeRun


def reproduce(preset_name: str = "tiny", loader: str = "trainable", cache: str = "concat", tokens: int = 256,
              out: str | Path = "results", *, seed: int = 0, prompt_len: int = 1, device: str = "cpu",
              checkpoint: str | Path | None = None, progress: bool = True) -> Reproduction:
    """Decode ``tokens`` tokens with one loader and cache; write per-step memory (CSV), a plot (PNG) and
    metadata (JSON) into ``out`` as ``reproduce-<preset>-<loader>-<cache>-<tokens>.*``.

    ``out`` is created before the run, so that an unusable folder fails at once (``OSError``).
    ``checkpoint`` replaces the preset's seeded checkpoint (whose config then names the model).
    """
    if tokens < 2:
        raise ValueError(f"tokens must be at least 2 (memory is compared at tokens/2 and tokens), got {tokens}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # named by the folder asked for, not by whichever parent failed
        raise OSError(exc.errno, f"cannot create the output folder ({exc.strerror})", str(out)) from None
    stem = out / f"reproduce-{preset_name}-{loader}-{cache}-{tokens}"
    directory = Path(checkpoint) if checkpoint is not None else build_checkpoint(preset_name, seed=seed)
    model = load_model(directory, loader, device=device)
    config = model.config
    run = measure(model, cache, tokens, loader=loader, prompt_len=prompt_len, seed=seed, rss=True, retained=True,
                  progress=progress)
    del model
    cleanup(device)
    frame = run.timeline
    # Growth since the first step: the first step also pays one-off costs (thread pools, allocator arenas).
    frame["rss_growth_bytes"] = frame["rss_bytes"] - frame["rss_bytes"].iloc[0]
    report = run.leak
    generated = run.generated[0].tolist()
    command = (f"kvlab reproduce --preset {preset_name} --loader {loader} --cache {cache} --tokens {tokens} "
               f"--seed {seed} --prompt-len {prompt_len} --device {device} --out {shlex.quote(str(out))}"
               + (f" --checkpoint {shlex.quote(str(directory))}" if checkpoint is not None else ""))
    meta: dict[str, Any] = jsonable({
        "preset": preset_name, "loader": loader, "cache": cache, "tokens": tokens, "seed": seed,
        "prompt": run.extra["prompt"][0].tolist(), "checkpoint": str(directory), "config": config,
        "rerun": command, "command": " ".join(map(shlex.quote, sys.argv)), "date": now_utc(),
        **environment(device),
        "generated_tokens": generated, "generated_sha256": hashlib.sha256(json.dumps(generated).encode()).hexdigest(),
        "seconds": run.seconds, "verdict": report.verdict, "leak_check": report.as_row(),
        "explanation": report.explanation, "columns": list(frame.columns),
    })  # as written: plain JSON data
    csv_path, json_path, png_path = stem.with_suffix(".csv"), stem.with_suffix(".json"), stem.with_suffix(".png")
    frame.to_csv(csv_path, index=False)
    write_json(json_path, meta)
    _plot(frame, png_path, config, loader, cache)
    return Reproduction(csv_path, png_path, json_path, generated, report.leak, meta, run)


def _plot(frame: pd.DataFrame, path: Path, config: Any, loader: str, cache: str) -> None:
    """The exact timeline (:func:`kvlab.study.plotting.plot_timeline`) with the KV cache and RSS growth added."""
    import matplotlib.pyplot as plt

    from .plotting import plot_timeline

    fig = plot_timeline(frame[["step", "live_bytes", "peak_bytes"]], config=config, loader=loader, cache=cache)
    ax = fig.axes[0]
    ax.plot(frame["step"], frame["cache_bytes"] / MiB, color="C2", label="KV cache tensors")
    if "kv_analytic_bytes" in frame and frame["kv_analytic_bytes"].notna().all():
        ax.plot(frame["step"], frame["kv_analytic_bytes"] / MiB, ":", color="k", label="KV cache, analytic")
    ax.plot(frame["step"], frame["rss_growth_bytes"] / MiB, color="C3", alpha=0.6, label="RSS growth since step 0")
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
