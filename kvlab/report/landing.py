"""The landing page (``index.md``, rendered by Sphinx like the notebooks): what was found, before what was run.

In order: the story in a few lines; the incident's figures next to kvlab's recording at the Mistral-7B
shape; one row per notebook (thumbnail, conclusion, checks, run time, status) with the checks added up;
then the parameters, environment, commit and date of this render.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

from .notebook import Checks, NotebookSummary

ASSETS = Path(__file__).resolve().parent / "assets"
TITLE = 'kvlab — the KV-cache "leak" investigation'


def _cell(text: object) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def commit(repo: Path) -> str:
    """Short commit of ``repo``, with a note when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} (with uncommitted changes)" if dirty else head


def environment(device: str) -> dict[str, object]:
    """The environment table every notebook opens with (versions, platform, device), plus the core count."""
    from kvlab.study.records import environment_table

    table = environment_table(device).iloc[:, 0].to_dict()
    table.pop("device.threads", None)  # this process's; each notebook sets its own
    return {**table, "cpu cores": os.cpu_count()}


def incident_table(results_dir: Path) -> str:
    """The incident's figures next to kvlab's traced runs at its length, from a GPU recording.

    Reads ``incident.csv`` through :func:`load_results`, the reader notebook 06 uses; says so in one line
    when the folder holds no such recording.
    """
    from kvlab.study.results import load_results

    try:
        table = load_results(results_dir).incident
    except FileNotFoundError:
        table = None
    if table is None or table.empty:
        return (f"*No GPU recording with an `incident.csv` under `{results_dir.name}`: record one with "
                "`python -m kvlab.experiments --suites incident` (see 06).*")
    rows = ["| run | total GB | `repeat_kv` GB | KV cache GB |", "| --- | ---: | ---: | ---: |"]
    for row in table.itertuples(index=False):
        parts = str(row.run).split(":")  # incident:kvlab:<dtype>:<loader>:<cache>:<tokens>:traced
        label = (f"kvlab, `{parts[3]}` weights, {parts[2]}, {parts[5]} tokens" if len(parts) >= 6
                 else f"**reported**: mistral.rs, {row.run}")
        values = [f"{v:.2f}" if v == v else "" for v in (row.total_GB, row.repeat_kv_GB, row.concat_GB)]
        rows.append("| " + " | ".join([label, *values]) + " |")
    return "\n".join(rows)


def _result(s: NotebookSummary) -> str:
    """The result column: status, checks, run time."""
    c = s.checks
    checks = f"{c.passed} of {c.total} checks passed" if c.total else "no checks"
    seconds = f"{s.seconds:.1f} s" if s.seconds is not None else "run time unknown"
    if s.ok:
        return f"ok: {checks}, {seconds}"
    anchor = f"#{s.error_anchor}" if s.error_anchor else ""
    where = f'<a href="{s.name}.html{anchor}">{_cell(s.error.split(":")[0])}</a>'
    return f"**failed** with {where}; {checks}, {c.not_run} not run; {seconds}"


def _summary_table(summaries: list[NotebookSummary], thumbs: dict[str, str]) -> str:
    """One row per notebook: thumbnail, linked title and conclusion, result. Opening-paragraph fallbacks
    (a notebook that states no conclusion) are set in italics."""
    if not summaries:
        return "*No notebook has been executed yet: run `python -m kvlab.report`.*"
    lines = ["```{list-table}", ":header-rows: 1", ":class: kv-summary", ":name: summary", ":widths: 22 58 20", "",
             "* - figure", "  - notebook and what it found", "  - result"]
    for s in summaries:
        thumb = f"![figure from {s.title}]({thumbs[s.name]})" if s.name in thumbs else "(no figure)"
        found = s.conclusion if s.conclusion_from != "opening" else f"*{s.conclusion}*"
        lines += [f"* - {thumb}", f"  - **[{s.title}]({s.name}.ipynb)**", "", f"    {found}",
                  f"  - {_result(s)}"]
    return "\n".join([*lines, "```"])


def _parameters_table(summaries: list[NotebookSummary], overrides: dict[str, object]) -> str:
    """Parameters several notebooks share (or given on the command line): one row each, with every value
    and the notebooks (by number) that ran with it. Each notebook's own parameters: one row per notebook."""
    values: dict[str, dict[str, list[str]]] = {}
    for s in summaries:
        for name, value in s.parameters.items():
            values.setdefault(name, {}).setdefault(repr(value), []).append(s.name.split("_")[0])
    shared = {n for n, by_value in values.items() if n in overrides or sum(map(len, by_value.values())) > 1}
    rows = ["| parameter | value (notebooks) |", "| --- | --- |"]
    for name in (n for n in values if n in shared):
        cells = []
        for value, numbers in values[name].items():
            everywhere = len(values[name]) == 1 and len(numbers) == len(summaries)
            cells.append(f"`{_cell(value)}` ({'all' if everywhere else ', '.join(numbers)})")
        rows.append(f"| `{name}`{' *given*' if name in overrides else ''} | {'; '.join(cells)} |")
    for s in summaries:
        own = [f"`{name} = {_cell(repr(value))}`" for name, value in s.parameters.items() if name not in shared]
        if own:
            rows.append(f"| {s.name.split('_')[0]} alone | {', '.join(own)} |")
    return "\n".join(rows)


def _key_values(pairs: dict[str, object]) -> str:
    return "\n".join(["| | value |", "| --- | --- |", *(f"| {k} | {_cell(v)} |" for k, v in pairs.items())])


def write_index(summaries: list[NotebookSummary], src: Path, thumbs: dict[str, str], overrides: dict[str, object],
                repo: Path, results_dir: Path, snapshots: list[str] = ()) -> Path:
    """Write ``src/index.md``; ``thumbs`` maps a notebook name to its thumbnail's path relative to ``src``,
    ``snapshots`` are the site paths of the CUDA memory snapshot pages."""
    total = sum((s.checks for s in summaries), Checks())
    failed = [s.title for s in summaries if not s.ok]
    verdict = (f"**{total.passed} of {total.total} checks passed** in {len(summaries)} notebooks"
               + (f"; {total.failed} failed, {total.not_run} did not run" if total.failed or total.not_run else "")
               + (f". Stopped early: {', '.join(failed)}." if failed else ": every claim holds on this run."))
    seconds = sum(s.seconds or 0.0 for s in summaries)
    device = str(overrides.get("device", "cpu"))
    about = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(repo),
             "notebook run time": f"{seconds:.0f} s", **environment(device)}
    reader = next((s for s in summaries if "results_dir" in s.parameters), None)  # reads the GPU recording
    toctree = ["```{toctree}", ":hidden:", "", *(s.name for s in summaries), "```"]
    page = "\n\n".join([
        f"# {TITLE}",
        (ASSETS / "story.md").read_text(encoding="utf-8").strip(),
        "## The incident's figures, and kvlab's",
        "Live memory after a ~100-word story (140 tokens) with the Mistral-7B shape: as reported for "
        "mistral.rs on a CPU, and as kvlab's exact tracer measured it on a GPU" + (
            f" ([{reader.title}]({reader.name}.ipynb) explains every difference)." if reader else "."),
        incident_table(results_dir),
        *(["PyTorch's own view of a leaking run, the CUDA allocator's memory timeline: " + ", ".join(
            f'<a href="{link}">{Path(link).stem}</a>' for link in snapshots) + "."] if snapshots else []),
        "## The notebooks",
        verdict,
        _summary_table(summaries, thumbs),
        "## How this was run",
        "Parameters (each notebook's defaults unless marked *given* on the command line):",
        _parameters_table(summaries, overrides),
        "Environment:",
        _key_values(about),
        "\n".join(toctree),
    ])
    index = src / "index.md"
    index.write_text(page + "\n", encoding="utf-8")
    return index
