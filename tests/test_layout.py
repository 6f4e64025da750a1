"""The architecture as checks: the three floors, no import cycles, small modules, a clean lint.

The floors are written down as import-linter contracts in ``pyproject.toml``; this file runs them, so
a change that makes a memory tool depend on kvlab's own model fails here, not in a user's project.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MAX_LINES = 400


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed next to {sys.executable}; "
                    "install the test extra: pip install -e '.[test]'")
    return str(path)


def test_import_contracts_are_kept() -> None:
    run = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "broken" not in run.stdout.split("Contracts:")[-1].split(",")[0]


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("kvlab")
    modules = sorted(graph.modules)
    cycles = []
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported == module or not imported.startswith("kvlab"):
                continue
            # A parent package importing its own child is how packages expose names, not a cycle.
            if imported.startswith(module + ".") or module.startswith(imported + "."):
                continue
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                cycles.append(" -> ".join((module, *back)))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


def test_modules_are_small() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "kvlab").rglob("*.py")}
    big = {path: n for path, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by concept): {big}"


def test_ruff_is_clean() -> None:
    run = subprocess.run([_tool("ruff"), "check", "kvlab", "tests", "benchmarks", "examples", "notebooks"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:]


NOTEBOOK_STACK = ("papermill", "nbclient", "nbconvert", "ipykernel", "jupyter_client", "sphinx", "myst_nb")


@pytest.mark.parametrize(("modules", "absent"), [
    # the core and the memory tools: what a user's project imports
    ("kvlab, kvlab.memory, kvlab.loaders, kvlab.caches, kvlab.generate",
     ("transformers", "ipywidgets", *NOTEBOOK_STACK)),
    ("kvlab.diagnose", ("transformers",)),  # transformers only for --hf, imported when used
    ("kvlab.study.explorer", ("ipywidgets",)),  # the widgets only when the explorer is built
])
def test_imports_load_no_optional_extra(modules: str, absent: tuple[str, ...]) -> None:
    """Checked in a fresh interpreter, where nothing else has imported the extras first."""
    code = f"import sys, {modules}; print(','.join(m for m in {absent!r} if sys.modules.get(m) is not None))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "", f"importing {modules} loaded: {run.stdout.strip()}"
