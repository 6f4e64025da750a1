"""The rendered site: pages a reader can open offline, with their own titles, working links and a landing page.

Fast tests check the pieces on small hand-made inputs (the link and network checker, the notebook
conventions, the snapshot page, a two-page site); the slow ones check the whole suite as ``make report``
renders it, sharing one render with tests/test_notebooks.py.
"""

from __future__ import annotations

import base64
import io
import pickle
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from torch.cuda._memory_viz import trace_plot

from kvlab.memory.units import MiB
from kvlab.report.build import build_site
from kvlab.report.check import check_site, read_page
from kvlab.report.notebook import checks, summarize
from kvlab.report.snapshot import SnapshotError, offline_snapshot, read_snapshot, timeline

REPO = Path(__file__).resolve().parent.parent
quiet = lambda *args, **kwargs: None  # noqa: E731


def _png() -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1], [0, 1])
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def _ran(source: str, status: str = "completed", outputs: list | None = None,
         tags: list[str] = ()) -> nbformat.NotebookNode:
    """A code cell as papermill leaves it."""
    cell = new_code_cell(source, outputs=outputs or [], execution_count=1 if status != "pending" else None)
    cell.metadata.update(papermill={"status": status}, tags=list(tags))
    return cell


def _executed(cells: list, metadata: dict | None = None, seconds: float = 1.5) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata.update(metadata or {}, papermill={"duration": seconds, "parameters": {"tokens": 64}},
                       kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
                       language_info={"name": "python", "pygments_lexer": "ipython3"})
    return nb


# --- the checker ---------------------------------------------------------------------------------------

def _write(root: Path, name: str, body: str, title: str | None = None) -> None:
    head = f"<title>{title or name}</title>" if title != "" else ""
    (root / name).write_text(f"<!doctype html><html><head>{head}</head><body>{body}</body></html>")


def test_check_site_accepts_a_clean_offline_site(tmp_path: Path) -> None:
    (tmp_path / "style.css").write_text("body { background: url('img.png') }")
    (tmp_path / "img.png").write_bytes(b"png")
    _write(tmp_path, "a.html", '<link rel="stylesheet" href="style.css?v=1"><img src="img.png"><h2 id="s">s</h2>'
                               '<a href="b.html#t">b</a><a href="https://github.com/x">external links are fine</a>')
    _write(tmp_path, "b.html", '<p id="t">t</p><a href="a.html#s">a</a><img src="data:image/png;base64,AAAA">')
    assert check_site(tmp_path) == []


@pytest.mark.parametrize("body, problem", [
    ('<script src="https://cdn.example.org/require.js"></script>', "loads https://cdn.example.org/require.js"),
    ('<link rel="stylesheet" href="//fonts.example.org/f.css">', "loads //fonts.example.org/f.css"),
    ('<iframe src="http://example.org/x"></iframe>', "loads http://example.org/x"),
    ("<style>@import 'https://fonts.example.org/css';</style>", "inline style or script loads from the network"),
    ('<script type="module">import {f} from "https://cdn.example.org/v.js"</script>',
     "inline style or script loads from the network"),
    ('<link rel="stylesheet" href="remote.css">', "remote.css loads from the network"),
    ('<a href="missing.html">x</a>', "missing.html does not resolve"),
    ('<img src="figure.png">', "figure.png does not resolve"),
    ('<a href="other.html#nowhere">x</a>', "no id 'nowhere' on that page"),
])
def test_check_site_flags_what_breaks_offline(tmp_path: Path, body: str, problem: str) -> None:
    (tmp_path / "remote.css").write_text("@font-face { src: url(https://fonts.example.org/a.woff2) }")
    _write(tmp_path, "other.html", "<p id='here'>x</p>")
    _write(tmp_path, "page.html", body)
    problems = check_site(tmp_path)
    assert len(problems) == 1 and problem in problems[0], problems


def test_check_site_wants_one_title_per_page(tmp_path: Path) -> None:
    _write(tmp_path, "a.html", "", title="Notebook")
    _write(tmp_path, "b.html", "", title="Notebook")
    _write(tmp_path, "c.html", "", title="")
    problems = check_site(tmp_path)
    assert sorted(p.split(":")[0] for p in problems) == ["a.html", "b.html", "c.html"]
    assert "c.html: no <title>" in problems


# --- what a notebook's card says ------------------------------------------------------------------------

def test_checks_count_asserts_by_outcome() -> None:
    nb = _executed([
        new_markdown_cell("# 01 — A title\n\nThe opening. It goes on."),
        _ran("assert 1\nfor i in range(3):\n    assert i >= 0\n%time x = 1"),
        _ran("assert 2\nassert False\nassert 3", status="failed",
             outputs=[new_output("error", ename="AssertionError", evalue="(1, 2)\nmore", traceback=[])]),
        _ran("assert 4", status="pending"),
        _ran("print('no checks here')"),
    ])
    counted = checks(nb)
    assert (counted.passed, counted.failed, counted.not_run) == (2, 1, 3)


def test_conclusion_thumbnail_and_parameters_follow_the_conventions(tmp_path: Path) -> None:
    png = _png()
    figure = new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"})
    said = new_output("display_data", data={"text/markdown": "The leak keeps **x3.9** for x2 tokens.",
                                            "text/plain": "<Markdown>"})
    cells = [new_markdown_cell("# 02 — Second\n\nOpening sentence one. Two."),
             _ran('tokens = 128\npreset = "tiny"', tags=["parameters"]),
             _ran("plot()", outputs=[new_output("display_data", data={"image/png": _png()})]),
             _ran("plot(2)", outputs=[figure], tags=["thumbnail"]),
             _ran("display(Markdown(...))", outputs=[said], tags=["conclusion"])]
    path = tmp_path / "02_second.ipynb"
    nbformat.write(_executed(cells, {"kvlab": {"conclusion": "From metadata."}}), path)
    s = summarize(path)
    assert (s.title, s.ok, s.seconds) == ("02 — Second", True, 1.5)
    assert (s.conclusion, s.conclusion_from) == ("The leak keeps **x3.9** for x2 tokens.", "cell")
    assert s.thumbnail == base64.b64decode(png)
    assert s.parameters == {"tokens": 64, "preset": "tiny"}  # papermill's value overrides the default

    cells[-1] = new_markdown_cell("plain prose")
    nbformat.write(_executed(cells, {"kvlab": {"conclusion": "From\nmetadata."}}), path)
    assert (summarize(path).conclusion, summarize(path).conclusion_from) == ("From metadata.", "metadata")
    nbformat.write(_executed(cells), path)
    assert (summarize(path).conclusion, summarize(path).conclusion_from) == ("Opening sentence one. Two.", "opening")


# --- the CUDA memory snapshot page ----------------------------------------------------------------------

def _snapshot() -> dict:
    """Ten steps that each keep 4 MiB (``repeat_kv``) and free a 1 MiB temporary; 2 MiB alive before."""
    def frames(line: int, name: str) -> list[dict]:
        return [{"filename": "/site-packages/torch/nn/functional.py", "line": 1, "name": "f"},
                {"filename": "/repo/kvlab/model.py", "line": line, "name": name}]

    def event(action: str, addr: int, size: int, t: int, where: list[dict]) -> dict:
        return {"action": action, "addr": addr, "size": size, "time_us": t, "frames": where}

    events, addr = [], 1 << 20
    for step in range(10):
        t, tmp = 10 * step, addr + 4 * MiB
        events += [event("alloc", addr, 4 * MiB, t, frames(7, "repeat_kv")), event("alloc", tmp, MiB, t + 1,
                   frames(9, "scores")), event("free_requested", tmp, MiB, t + 2, []),
                   event("free_completed", tmp, MiB, t + 3, [])]
        addr += 5 * MiB
    block = lambda a, size: {"address": a, "size": size, "requested_size": size, "state": "active_allocated",  # noqa: E731
                             "frames": []}
    kept = [block(0, 2 * MiB)] + [block((1 << 20) + 5 * MiB * i, 4 * MiB) for i in range(10)]
    return {"segments": [{"device": 0, "address": 0, "total_size": addr, "stream": 0, "blocks": kept}],
            "device_traces": [events]}


def test_offline_snapshot_from_trace_plot(tmp_path: Path) -> None:
    source = tmp_path / "recorded" / "leak.html"
    source.parent.mkdir()
    source.write_text(trace_plot(_snapshot()))
    assert "https://" in source.read_text()  # torch's own page fetches its viewer from a CDN
    tl = timeline(read_snapshot(source))
    assert tl.total[0] == 2 * MiB and tl.total[-1] == 42 * MiB and tl.total.max() == 43 * MiB
    assert tl.sites[0] == "kvlab/model.py:7 repeat_kv"
    page = offline_snapshot(source, tmp_path / "site" / "leak.html")
    assert check_site(page.parent) == []
    assert read_page(page).title == "CUDA memory snapshot — leak"
    assert read_snapshot(page.with_suffix(".pickle")) == _snapshot()
    recorded = tmp_path / "recorded" / "leak.pickle"  # a pickle rendered next to itself stays as recorded
    recorded.write_bytes(pickle.dumps(_snapshot(), protocol=2))
    offline_snapshot(recorded, recorded.with_suffix(".html"))
    assert recorded.read_bytes() == pickle.dumps(_snapshot(), protocol=2)


def test_snapshot_reader_refuses_what_is_not_plain_data(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps(subprocess.Popen))  # a class reference: code a plain unpickler would import
    with pytest.raises(SnapshotError, match="plain data only"):
        read_snapshot(evil)
    page = tmp_path / "page.html"
    page.write_text("<html><script src='https://cdn.example.org/MemoryViz.js'></script></html>")
    with pytest.raises(SnapshotError, match="no embedded snapshot"):
        read_snapshot(page)


# --- a small site, built from hand-made executed notebooks --------------------------------------------

def test_small_site_has_titles_links_summary_and_folded_code(tmp_path: Path) -> None:
    executed = tmp_path / "out" / "executed"
    executed.mkdir(parents=True)
    first = [new_markdown_cell("# 01 — First page\n\nNext: [the second](02_second.ipynb#a-section)."),
             _ran("x = 1\nassert x == 1\nx", outputs=[new_output("execute_result", data={"text/plain": "1"})]),
             _ran("for _ in tqdm(range(3)): pass", outputs=[new_output("display_data", data={
                 "application/vnd.jupyter.widget-view+json": {"model_id": "m1", "version_major": 2, "version_minor": 0},
                 "text/plain": "progress:   0%|          | 0/3"})])]
    second = [new_markdown_cell("# 02 — Second page\n\n## A section\n\nBack to [01](01_first.ipynb); the allocator's "
                                "view: [snapshot](../data/gpu/snapshot/leak.html)."),
              _ran("assert 1 == 2", status="failed", outputs=[new_output("error", ename="AssertionError", evalue="",
                                                                          traceback=["AssertionError"])])]
    nbformat.write(_executed(first), executed / "01_first.ipynb")
    nbformat.write(_executed(second), executed / "02_second.ipynb")
    snapshots = tmp_path / "snapshot"
    snapshots.mkdir()
    (snapshots / "leak.html").write_text(trace_plot(_snapshot()))
    site = build_site(tmp_path / "out", ["01_first", "02_second"], {}, REPO, REPO / "data" / "gpu", snapshots)
    assert check_site(site.root) == [] and site.warnings == []
    assert [p.relative_to(site.root).as_posix() for p in site.snapshots] == ["snapshots/leak.html"]
    assert 'href="snapshots/leak.html"' in (site.root / "02_second.html").read_text()
    assert read_page(site.root / "01_first.html").title.startswith("01 — First page")
    assert read_page(site.root / "02_second.html").title.startswith("02 — Second page")
    first_page = (site.root / "01_first.html").read_text()
    assert 'href="02_second.html#a-section"' in first_page and ".ipynb#" not in first_page
    assert re.search(r'<details class="[^"]*above-input', first_page)  # code folded behind a toggle
    assert "progress:" not in first_page  # a progress bar's first frame is no result
    index = (site.root / "index.html").read_text()
    assert "1 of 2 checks passed" in index and 'class="kv-summary table"' in index
    assert 'href="snapshots/leak.html"' in index
    assert '<strong>failed</strong> with <a href="02_second.html">AssertionError</a>' in index


def test_report_command_rejects_a_missing_notebook() -> None:
    proc = subprocess.run([sys.executable, "-m", "kvlab.report", "nope.ipynb"], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", "kvlab report: no such notebook: nope.ipynb\n")


# --- the whole suite, as `make report` renders it -------------------------------------------------------

@pytest.mark.slow
def test_rendered_suite_opens_offline_with_working_links(rendered_site) -> None:
    assert check_site(rendered_site.root) == []
    assert rendered_site.warnings == []


@pytest.mark.slow
def test_every_report_has_its_notebook_title(rendered_site) -> None:
    for s in rendered_site.summaries:
        assert read_page(rendered_site.root / f"{s.name}.html").title.startswith(s.title), s.name


@pytest.mark.slow
def test_index_carries_the_summary_table(rendered_site) -> None:
    index = (rendered_site.root / "index.html").read_text()
    table = index[index.index('class="kv-summary table"'):]
    table = table[:table.index("</table>")]
    rows = table.split("<tr")[2:]  # after the header row
    assert len(rows) == len(rendered_site.summaries)
    for row, s in zip(rows, rendered_site.summaries):
        assert f'href="{s.name}.html"' in row and 'src="_images/' in row, s.name
    passed = sum(s.checks.passed for s in rendered_site.summaries)
    total = sum(s.checks.total for s in rendered_site.summaries)
    assert f"{passed} of {total} checks passed" in index
    for key in ("commit", "date", "torch", "parameter"):
        assert key in index
