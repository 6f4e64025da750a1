"""Run one notebook top to bottom with papermill, keeping the executed copy even when a cell fails.

The executed notebook describes itself: papermill records the parameters, the duration and which cell
failed in its metadata, so everything after this step (the summary, the site) reads only that file.
"""

from __future__ import annotations

import ast
import tempfile
from pathlib import Path


def parse_value(text: str) -> object:
    """``-p tokens 256`` gives an int, ``-p loaders "['inference']"`` a list, anything else a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def execute(notebook: Path, executed_dir: Path, parameters: dict[str, object], timeout: int = 600) -> Path:
    """Execute ``notebook`` in its own folder (so relative paths in it work) into ``executed_dir``.

    A failing cell does not raise: papermill marks it in the executed copy, which is rendered like any
    other so that the report shows where the story stopped holding.
    """
    import papermill
    from traitlets.config import Config

    executed = executed_dir / notebook.name
    executed_dir.mkdir(parents=True, exist_ok=True)
    # A local kernel over IPC sockets: no network ports, no TCP warning. The sockets get a folder of their
    # own: by default they are named kernel-ipc-N in the notebook's folder, where a second run started at
    # the same time (a test beside `make report`) would pick the same names and cross messages.
    with tempfile.TemporaryDirectory(prefix="kvlab-kernel-") as sockets:
        config = Config({"KernelManager": {"transport": "ipc", "ip": f"{sockets}/k"}})
        try:
            papermill.execute_notebook(str(notebook), str(executed), parameters=parameters, cwd=str(notebook.parent),
                                       kernel_name="python3", progress_bar=False, execution_timeout=timeout,
                                       config=config)
        except papermill.PapermillExecutionError:
            pass  # recorded in the executed notebook's metadata; see kvlab.report.notebook
    return executed
