"""Execute the investigation notebooks and render them as HTML reports with an index page.

The committed notebooks carry no outputs; this is the one command that fills them in. Parameters given
with ``-p name value`` are passed to every notebook's papermill ``parameters`` cell, so the whole suite
reruns at another scale or on a GPU (``-p preset small -p device cuda``).
"""

from __future__ import annotations

import argparse
import ast
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@dataclass
class Rendered:
    notebook: Path
    html: Path
    seconds: float
    error: str | None


def _parse_value(text: str) -> object:
    """``-p tokens 256`` gives an int, ``-p loaders "['inference']"`` a list, anything else a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def execute(notebook: Path, out_dir: Path, parameters: dict[str, object], timeout: int = 600) -> Rendered:
    """Run one notebook with papermill, then render it to HTML (also when it failed, to show where)."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    executed = out_dir / "executed" / notebook.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    error = None
    try:
        papermill.execute_notebook(str(notebook), str(executed), parameters=parameters, cwd=str(notebook.parent),
                                   kernel_name="python3", progress_bar=False, execution_timeout=timeout,
                                   # a local kernel over IPC sockets: no network ports, no TCP warning
                                   config=Config({"KernelManager": {"transport": "ipc"}}))
    except papermill.PapermillExecutionError as exc:
        error = f"{exc.ename}: {exc.evalue}"
    seconds = time.perf_counter() - start
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nbformat.read(executed, as_version=4))
    target = out_dir / notebook.with_suffix(".html").name
    target.write_text(body, encoding="utf-8")
    return Rendered(notebook, target, seconds, error)


def _title(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    for cell in cells:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("#"):
                    return line.lstrip("# ").strip()
    return notebook.stem


def write_index(results: list[Rendered], out_dir: Path, parameters: dict[str, object]) -> Path:
    rows = "\n".join(
        f"<tr><td><a href='{html.escape(r.html.name)}'>{html.escape(_title(r.notebook))}</a></td>"
        f"<td>{r.seconds:.1f} s</td><td>{'ok' if r.error is None else html.escape('FAILED: ' + r.error)}</td></tr>"
        for r in results)
    params = html.escape(json.dumps(parameters)) if parameters else "defaults"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>kvlab reports</title>
<style>body{{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;line-height:1.5}}
table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ddd;padding:.4rem;text-align:left}}</style>
</head><body><h1>kvlab — the KV-cache "leak" investigation</h1>
<p>Each report is a notebook executed top to bottom (parameters: {params}).</p>
<table><tr><th>report</th><th>run time</th><th>status</th></tr>
{rows}
</table></body></html>
"""
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvlab report", description=__doc__)
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: all in notebooks/)")
    parser.add_argument("-o", "--out", type=Path, default=Path("reports"), help="output folder (default: reports)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="papermill parameter passed to every notebook")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    parameters = {name: _parse_value(value) for name, value in args.parameter}
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for notebook in notebooks:
        result = execute(notebook.resolve(), args.out.resolve(), parameters, args.timeout)
        status = "ok" if result.error is None else f"FAILED ({result.error})"
        print(f"{notebook.name:45s} {result.seconds:6.1f} s  {status}", flush=True)
        results.append(result)
    index = write_index(results, args.out.resolve(), parameters)
    print(f"reports: {index}")
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
