"""Every notebook runs top to bottom at its default scale, and is committed without outputs.

The notebooks assert the claims their prose makes, so a notebook that runs is a story still true.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9]*.ipynb"))


def test_there_are_notebooks() -> None:
    assert len(NOTEBOOKS) >= 8


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path) -> None:
    cells = json.loads(path.read_text())["cells"]
    dirty = [i for i, c in enumerate(cells)
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in cells), \
        f"{path.name}: no parameters cell"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, rendered_site) -> None:
    """Executed once for the session by ``kvlab.report`` (the ``rendered_site`` fixture), as ``make report`` does."""
    summary = {s.name: s for s in rendered_site.summaries}.get(path.stem)
    assert summary is not None, f"{path.name} was not rendered"
    assert summary.ok, f"{path.name} stopped at {summary.error}"
    assert summary.checks.passed > 0 and summary.checks.passed == summary.checks.total, summary.checks
