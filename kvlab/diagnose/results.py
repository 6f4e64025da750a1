"""A diagnosis as data: tables and sentences, written as CSV + JSON and read back unchanged.

The command measures once and writes the files; the rendered report (``notebooks/08_diagnose.ipynb``)
reads them. So the report's figures and the CSV files a user shares are the same numbers, and a report
can be re-rendered later without running the loop again.

Files in the output folder: ``diagnosis.json`` (verdict, sentences, growth law, metadata) and one CSV
per table: ``kept`` (bytes kept at each length, by kind), ``parts`` (what the loop returns, part by
part), ``sites`` (attribution by region: peak and alive at the end), ``timeline`` (live and peak bytes
per forward pass of the longest run), ``saved_by_op`` and
``saved_by_site`` (the tensors autograd saved), ``leaves`` (tensors requiring grad that the graph
reaches), ``validation`` (findings on every module), ``fix`` (the loop under ``inference_mode`` and
with frozen weights) and ``guard`` (the leak guard's figures at N and 2N tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kvlab.memory.units import fmt_bytes
from kvlab.study.records import write_json

__all__ = ["Diagnosis", "readable", "EXIT_OK", "EXIT_LEAK", "EXIT_BAD_INPUT"]

EXIT_OK, EXIT_LEAK, EXIT_BAD_INPUT = 0, 1, 2


@dataclass
class Diagnosis:
    """Everything the report shows. Build it with :func:`kvlab.diagnose.diagnose`, or :meth:`load` a saved one."""

    meta: dict[str, Any]  # target, device, tokens, lengths, modules, config, environment
    verdict: str  # the leak guard's: "LEAK" or "ok"
    headline: str  # the verdict in one sentence
    causes: list[str]  # why memory is kept, one sentence each ("label: explanation")
    explanation: str  # the leak guard's own explanation
    retention: str  # the retention explainer's summary
    growth: dict[str, Any]  # fitted power law of kept bytes: slope, prefactor, law
    fix_summary: str
    snapshot: dict[str, str] = field(default_factory=dict)  # CUDA snapshot file names in the folder, when recorded
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def leak(self) -> bool:
        return self.verdict == "LEAK"

    @property
    def exit_code(self) -> int:
        return EXIT_LEAK if self.leak else EXIT_OK

    def __getattr__(self, name: str) -> pd.DataFrame:
        """Tables as attributes: ``diagnosis.kept``, ``diagnosis.sites`` ..."""
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(name)

    def about(self) -> pd.DataFrame:
        """What was diagnosed and where: target, lengths, modules, versions and device (one column)."""
        m = self.meta
        rows: dict[str, Any] = {"target": m["target"], "device": m["device"],
                                "tokens (lengths run)": ", ".join(map(str, m["lengths"])),
                                "modules found": ", ".join(f"{k} ({v})" for k, v in m["modules"].items()) or "none"}
        for key, value in m["environment"].items():
            if isinstance(value, dict):
                rows.update({f"{key}.{k}": v for k, v in value.items()})
            elif value is not None:
                rows[key] = value
        return pd.Series(rows, name="diagnosis").to_frame()

    def save(self, out: str | Path) -> Path:
        """Write ``diagnosis.json`` and one CSV per table into ``out``; return the JSON's path."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name, table in self.tables.items():
            table.to_csv(out / f"{name}.csv", index=False)
        data = {k: v for k, v in vars(self).items() if k != "tables"}
        return write_json(out / "diagnosis.json", {**data, "leak": self.leak, "tables": sorted(self.tables)})

    @classmethod
    def load(cls, out: str | Path) -> Diagnosis:
        """Read a folder written by :meth:`save`."""
        out = Path(out)
        data = json.loads((out / "diagnosis.json").read_text())
        tables = {}
        for name in data.pop("tables"):
            try:
                tables[name] = pd.read_csv(out / f"{name}.csv")
            except pd.errors.EmptyDataError:  # a table with no columns at all
                tables[name] = pd.DataFrame()
        data.pop("leak", None)
        return cls(**data, tables=tables)


def readable(table: pd.DataFrame, index: str | None = None) -> pd.DataFrame:
    """``table`` for reading: ``*_bytes`` columns as ``"1.50 MiB"`` / ``"12.0 KiB"`` (named without the
    suffix), shares as percentages, underscores as spaces; ``index`` becomes the index."""
    out = table.copy()
    for column in table.columns:
        if column.endswith("_bytes"):
            out[column] = table[column].map(lambda v: fmt_bytes(v) if pd.notna(v) else "")
        elif column.endswith("share"):
            out[column] = table[column].map(lambda v: f"{v:.0%}" if pd.notna(v) else "")
    out = out.rename(columns={c: c.removesuffix("_bytes").replace("_", " ") for c in out.columns})
    return out.set_index(index.replace("_", " ")) if index else out
