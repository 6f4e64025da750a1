"""``python -m kvlab.report [notebook ...] [-p name value ...]``: execute, render, check, print the times."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nbformat

from .build import Site, build_site
from .check import check_site
from .execute import execute, parse_value
from .notebook import error

REPO = Path(__file__).resolve().parent.parent.parent
NOTEBOOKS = REPO / "notebooks"
EXIT_USAGE = 2
DESCRIPTION = ("Execute the investigation notebooks and render them as a static site that opens offline "
               "(reports/index.html). Parameters given with -p go to every notebook's parameters cell.")


def render(notebooks: list[Path], out: Path, parameters: dict[str, object], timeout: int = 600,
           suite: list[str] | None = None, echo: Callable[..., None] = print) -> Site:
    """Execute ``notebooks`` into ``out/executed``, then build the site in ``out``.

    The site holds every notebook of the ``suite`` (names; default: those in notebooks/) that has an
    executed copy in ``out/executed``: those run now, and those run earlier, so that links between pages
    hold when one notebook is rerun alone.
    """
    out = out.resolve()
    start = time.perf_counter()
    for notebook in notebooks:
        t0 = time.perf_counter()
        executed = execute(notebook.resolve(), out / "executed", parameters, timeout)
        failed = error(nbformat.read(executed, as_version=4))
        echo(f"{notebook.name:28s} {time.perf_counter() - t0:6.1f} s  {'ok' if failed is None else 'FAILED'}",
             flush=True)
    ran = time.perf_counter() - start
    known = {p.stem for p in NOTEBOOKS.glob("[0-9]*.ipynb")} if suite is None else set(suite)
    names = [n for n in sorted(known | {p.stem for p in notebooks}) if (out / "executed" / f"{n}.ipynb").is_file()]
    results_dir = NOTEBOOKS / str(parameters.get("results_dir", "../data/gpu"))
    t0 = time.perf_counter()
    site = build_site(out, names, parameters, REPO, results_dir.resolve(), REPO / "data" / "gpu" / "snapshot")
    echo(f"{'site (Sphinx)':28s} {time.perf_counter() - t0:6.1f} s", flush=True)
    echo(f"{'total':28s} {time.perf_counter() - start:6.1f} s ({ran:.1f} s executing notebooks)", flush=True)
    return site


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvlab report", description=DESCRIPTION)
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: all in notebooks/)")
    parser.add_argument("-o", "--out", type=Path, default=Path("reports"), help="output folder (default: reports)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="papermill parameter passed to every notebook")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild the site from the executed notebooks already in OUT/executed")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    missing = [str(p) for p in notebooks if not p.is_file() or p.suffix != ".ipynb"]
    if missing:
        print(f"kvlab report: no such notebook: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    if args.render_only and not (args.out / "executed").is_dir():
        print(f"kvlab report: --render-only needs executed notebooks in {args.out / 'executed'}; run without it first",
              file=sys.stderr)
        return EXIT_USAGE
    parameters = {name: parse_value(value) for name, value in args.parameter}
    site = render([] if args.render_only else notebooks, args.out, parameters, args.timeout)
    problems = check_site(site.root)
    for warning in site.warnings:
        print(f"sphinx: {warning}")
    for problem in problems:
        print(f"site check: {problem}")
    failed = [s for s in site.summaries if not s.ok]
    for s in failed:
        print(f"FAILED {s.name}: {s.error}")
    checks = sum(s.checks.passed for s in site.summaries), sum(s.checks.total for s in site.summaries)
    print(f"{checks[0]} of {checks[1]} checks passed in {len(site.summaries)} notebooks; "
          f"site check: {len(problems)} problems")
    print(f"reports: {site.index}")
    return 0 if not failed and not problems else 1
