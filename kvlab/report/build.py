"""Turn executed notebooks into a static site with Sphinx (myst-nb + sphinx-book-theme).

Sphinx gives each page its notebook's first heading as ``<title>``, resolves ``NN_name.ipynb`` links to the
rendered pages, and builds the navigation and a local search. This module prepares its sources: the
executed notebooks with their code folded (the outputs are the report; a button unfolds the code),
the landing page, the thumbnails; then it runs Sphinx and writes the offline CUDA snapshot pages.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nbformat

from .landing import write_index
from .notebook import NotebookSummary, summarize
from .snapshot import offline_snapshot

ASSETS = Path(__file__).resolve().parent / "assets"
WIDGET = "application/vnd.jupyter.widget-view+json"
HIDE = "hide-input"  # myst-nb folds the cell's source behind "Show code cell source"
SNAPSHOT_DIR = "snapshots"  # where snapshot pages go in the site
# A markdown link to a recorded snapshot, e.g. [the snapshot](../data/gpu/snapshot/leak.html)
_SNAPSHOT_LINK = re.compile(r"\[([^\]]+)\]\((?:\.\./)?data/gpu/snapshot/([\w.-]+?)\.(?:html|pickle)\)")


@dataclass
class Site:
    """A rendered site: its root folder and what it holds."""

    root: Path
    summaries: list[NotebookSummary]
    snapshots: list[Path]
    warnings: list[str]  # Sphinx's, one per line

    @property
    def index(self) -> Path:
        return self.root / "index.html"


def _prepare(executed: Path, target: Path) -> None:
    """Copy an executed notebook for Sphinx: code folded (except a failed cell's), snapshot links local,
    widgets dropped (a progress bar's saved text is its first frame, and a page has no kernel to drive it)."""
    nb = nbformat.read(executed, as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.get("outputs", []) if WIDGET not in o.get("data", {})]
            failed = any(o.output_type == "error" for o in cell.get("outputs", []))
            if not failed and HIDE not in tags and "remove-input" not in tags:
                tags.append(HIDE)
        elif cell.cell_type == "markdown":
            cell.source = site_links(cell.source)
    nbformat.write(nb, target)


def site_links(markdown: str) -> str:
    """Markdown with links to recorded snapshots pointed at their offline pages in the site."""
    return _SNAPSHOT_LINK.sub(rf'<a href="{SNAPSHOT_DIR}/\2.html">\1</a>', markdown)


def _snapshot_sources(snapshot_dir: Path) -> list[Path]:
    """Recorded snapshots: each ``trace_plot`` page, or a pickle that has no page beside it."""
    pages = sorted(snapshot_dir.glob("*.html"))
    stems = {p.stem for p in pages}
    return pages + sorted(p for p in snapshot_dir.glob("*.pickle") if p.stem not in stems)


def _run_sphinx(src: Path, out: Path, doctrees: Path) -> list[str]:
    """Run Sphinx in a child process (its extensions keep global state); return its warnings."""
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-E", "-d", str(doctrees), str(src), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    warnings = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode != 0:
        raise RuntimeError("Sphinx failed:\n" + "\n".join(warnings[-20:]))
    return warnings


def _clean(out: Path, names: set[str]) -> None:
    """Remove what an earlier render left in ``out`` (only the site's own files and folders)."""
    for name in ("_static", "_images", "_sources", SNAPSHOT_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for path in out.glob("*.html"):
        if path.stem in names | {"index", "search", "genindex"} or re.match(r"\d\d_", path.stem):
            path.unlink()


def build_site(out: Path, notebook_names: list[str], overrides: dict[str, object], repo: Path,
               results_dir: Path, snapshot_dir: Path) -> Site:
    """Render ``out/executed/<name>.ipynb`` for each name (in order) into the site rooted at ``out``."""
    with tempfile.TemporaryDirectory(prefix="kvlab-site-") as work:  # Sphinx wants its sources outside `out`
        src = Path(work) / "src"
        (src / "_static").mkdir(parents=True)
        (src / "_thumbs").mkdir()
        shutil.copy(ASSETS / "conf.py", src / "conf.py")
        for asset in ("kvlab.css", "kvlab.js"):
            shutil.copy(ASSETS / asset, src / "_static" / asset)
        summaries, thumbs = [], {}
        for name in notebook_names:
            executed = out / "executed" / f"{name}.ipynb"
            summary = summarize(executed)
            summary.conclusion = site_links(summary.conclusion)
            summaries.append(summary)
            _prepare(executed, src / executed.name)
            if summary.thumbnail is not None:
                (src / "_thumbs" / f"{name}.png").write_bytes(summary.thumbnail)
                thumbs[name] = f"_thumbs/{name}.png"
        snapshots = _snapshot_sources(snapshot_dir) if snapshot_dir.is_dir() else []
        write_index(summaries, src, thumbs, overrides, repo, results_dir,
                    snapshots=[f"{SNAPSHOT_DIR}/{p.stem}.html" for p in snapshots])
        _clean(out, set(notebook_names))
        warnings = _run_sphinx(src, out, Path(work) / "doctrees")
    pages = [offline_snapshot(p, out / SNAPSHOT_DIR / f"{p.stem}.html", back="../index.html") for p in snapshots]
    return Site(out, summaries, pages, warnings)
