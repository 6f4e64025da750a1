"""``kvlab diagnose``: measure a decode loop, write the figures as CSV/JSON, render the report.

Exit codes: **0** no leak, **1** leak found, **2** bad input (a target that cannot be imported or
called, a loop that returns no tensors or raises, a missing or corrupt checkpoint, a device that is
not there), each with one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from kvlab.study.env import parse_device

from .hf import hf_target
from .measure import diagnose, lengths_for
from .results import EXIT_BAD_INPUT, Diagnosis
from .target import BadTarget, load_target

__all__ = ["main", "build_parser", "render"]

NOTEBOOKS = Path(__file__).resolve().parent.parent.parent / "notebooks"  # in a source checkout
REPORT = "08_diagnose.ipynb"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvlab diagnose",
        description="Run a decode loop at several lengths and report what it keeps alive and why: verdict, "
                    "kept bytes against tokens with the fitted growth law, attribution by region, the autograd "
                    "retention explanation, model validation, and the fix verified (inference_mode, frozen "
                    "weights). Writes an HTML report plus CSV/JSON into --out.",
        epilog="exit codes: 0 no leak, 1 leak found, 2 bad input")
    parser.add_argument("target", nargs="?", metavar="TARGET",
                        help="path/to/file.py:function or package.module:function, a function run(steps) that "
                             "decodes `steps` tokens and returns what the loop keeps (cache, logits, state)")
    parser.add_argument("--hf", metavar="DIR", type=Path,
                        help="instead of TARGET: a Hugging Face causal-LM checkpoint directory, loaded with "
                             "AutoModelForCausalLM.from_pretrained and decoded greedily in grad mode")
    parser.add_argument("--tokens", type=int, default=64, metavar="N",
                        help="longest run in tokens; the loop also runs at N/2, N/4 and N/8 (default 64)")
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda", help="where the loop runs (default cpu)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: reports/diagnose-<target>)")
    parser.add_argument("--no-html", action="store_true", help="write the CSV/JSON only, do not render the report")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _device(name: str) -> str:
    try:
        device = parse_device(name)
    except ValueError as exc:
        raise BadTarget(str(exc)) from None
    if device.type not in ("cpu", "cuda"):
        raise BadTarget(f"--device {name!r}: diagnose runs on cpu or cuda")
    return str(device)


def _out_dir(out: Path | None, name: str) -> Path:
    """The output folder, created; refuses a non-empty folder that holds something other than a diagnosis."""
    if out is None:
        out = Path("reports") / ("diagnose-" + re.sub(r"[^\w.-]+", "-", name).strip("-.")[-80:])
    if out.is_dir() and any(out.iterdir()) and not (out / "diagnosis.json").is_file():
        raise BadTarget(f"--out {out}: folder exists and holds other files; give a new or a diagnosis folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadTarget(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    return out


def render(out: Path) -> tuple[Path | None, str | None]:
    """Render the report notebook on a saved diagnosis with ``python -m kvlab.report``, exactly as the
    investigation's notebooks are rendered (same look); returns the page and an error line, if any."""
    notebook = NOTEBOOKS / REPORT
    if not notebook.is_file():
        return None, f"{notebook} not found (the notebooks come with a source checkout); CSV/JSON written"
    if importlib.util.find_spec("papermill") is None:
        return None, "rendering needs the notebooks extra (pip install 'kvlab[notebooks]'); CSV/JSON written"
    out = out.resolve()
    command = [sys.executable, "-m", "kvlab.report", str(notebook), "--out", str(out), "-p", "diagnosis_dir", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    page = out / notebook.with_suffix(".html").name
    if done.returncode == 0 and page.is_file():
        return page, None
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    problems = [line for line in lines if line.startswith(("FAILED", "site check:", "kvlab report:"))] or lines[-1:]
    return (page if page.is_file() else None), "; ".join(problems) or f"exit code {done.returncode}"


def main(argv: list[str] | None = None) -> int:
    """``kvlab diagnose ...``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if (args.target is None) == (args.hf is None):
            raise BadTarget("give either TARGET (file.py:function or package.module:function) or --hf DIR")
        device = _device(args.device)
        lengths_for(args.tokens)  # a bad --tokens is reported before anything is loaded
        target = hf_target(args.hf, device) if args.hf is not None else load_target(args.target)
        out = _out_dir(args.out, args.hf.resolve().name if args.hf is not None else args.target)
        diagnosis: Diagnosis = diagnose(target, args.tokens, device=device, out=out, progress=not args.quiet)
    except BadTarget as exc:
        print(f"kvlab diagnose: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    diagnosis.save(out)
    print(diagnosis.headline)
    for cause in diagnosis.causes:
        print(f"  - {cause}")
    if not args.no_html:
        page, error = render(out)
        if error:
            print(f"kvlab diagnose: the report did not render fully: {error}", file=sys.stderr)
        if page is not None:
            print(f"report: {page}")
    print(f"data:   {out / 'diagnosis.json'} and {len(diagnosis.tables)} CSV tables")
    return diagnosis.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
