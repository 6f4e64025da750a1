"""Every file kvlab writes says how it was made: one environment record and one JSON writer.

A CSV found months later is only worth something if its metadata says which code, versions, device
and command produced it. Everything kvlab records goes through here:

- :func:`environment`: versions and device, the same dict in a notebook's first cell
  (:func:`environment_table`), in ``kvlab reproduce``'s JSON and in ``python -m kvlab.experiments``'s
  ``meta.json`` (whose readers, :mod:`kvlab.study.results`, rely on its ``device`` sub-dict);
- :func:`save_results`: one table as ``<path>.csv`` plus its metadata as ``<path>.json``;
- :class:`Recorder`: the experiments' ``steps.csv`` / ``runs.csv`` / ``meta.json``, rewritten after
  every run so that an interrupted session still leaves its data.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import platform
import sys
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

__all__ = ["environment", "environment_table", "now_utc", "jsonable", "write_json", "save_results", "Recorder"]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def now_utc() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Versions, platform and the device a run used.

    transformers' version is read from the installed metadata, without importing it (it is an optional
    extra and slow to import). ``device`` is a dict: ``type`` and ``name``, on CUDA also the memory,
    multiprocessor count, compute capability and CUDA version, on a CPU the torch thread count.
    """
    from kvlab import __version__

    device = torch.device(device)
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "kvlab": __version__, "transformers": _version("transformers"),
                            "platform": platform.platform(), "device": {"type": device.type}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"].update(name=props.name, total_bytes=props.total_memory,
                              multiprocessors=props.multi_processor_count,
                              capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        info["device"].update(name=platform.processor() or platform.machine() or "cpu",
                              threads=torch.get_num_threads())
    return info


def environment_table(device: str | torch.device = "cpu") -> pd.DataFrame:
    """:func:`environment` as a one-column table (``device.name`` ... flattened), a notebook's first output."""
    flat: dict[str, Any] = {}
    for key, value in environment(device).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return pd.Series(flat, name="environment").to_frame()


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: configs through ``to_dict``, dataclasses as dicts, dtypes, devices
    and paths as strings, non-finite floats as ``null``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return jsonable(value.item())  # numpy and torch scalars
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return jsonable(value.to_dict())
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    return str(value)


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` (made :func:`jsonable`) as indented JSON, creating the folder; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=2) + "\n")
    return path


def save_results(df: pd.DataFrame, path: str | Path, *, config: Any = None, loader: str | None = None,
                 cache: str | None = None, device: str | torch.device = "cpu", command: str | None = None,
                 **meta: Any) -> tuple[Path, Path]:
    """Write ``df`` as ``<path>.csv`` and its metadata as ``<path>.json``; return both paths.

    The JSON holds the model config (a kvlab or transformers config, or a dict), loader, cache, the
    :func:`environment` of ``device``, the UTC date, the command line and the table's columns, plus
    any ``meta`` given, so that the CSV says how it was made.
    """
    path = Path(path)
    if path.suffix in (".csv", ".json"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = path.with_suffix(".csv"), path.with_suffix(".json")
    df.to_csv(csv_path, index=False)
    info = {"config": config, "loader": loader, "cache": cache, **environment(device), "date": now_utc(),
            "command": command if command is not None else " ".join(sys.argv),
            "columns": list(df.columns), "rows": len(df), **meta}
    write_json(json_path, info)
    return csv_path, json_path


@dataclass
class Recorder:
    """Per-step rows, per-run rows and metadata of a session; :meth:`flush` rewrites all three files.

    ``steps.csv`` puts ``first_columns`` first, then the ``live_<region>`` columns (sorted), then the rest.
    """

    out: Path
    meta: dict[str, Any]
    first_columns: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def flush(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.steps:
            frame = pd.DataFrame(self.steps)
            first = [c for c in self.first_columns if c in frame.columns]
            regions = sorted(c for c in frame.columns if c.startswith("live_") and c not in first)
            frame = frame[first + regions + [c for c in frame.columns if c not in first and c not in regions]]
            frame.to_csv(self.out / "steps.csv", index=False)
        if self.runs:
            pd.DataFrame(self.runs).to_csv(self.out / "runs.csv", index=False)
        self.meta["updated"] = now_utc()
        write_json(self.out / "meta.json", self.meta)
