"""What the landing page says about one executed notebook: title, status, checks, conclusion, thumbnail.

Conventions a notebook follows so that its card on the landing page reads well (all optional):

- **Conclusion**: one cell tagged ``conclusion``. A markdown cell gives its text; a code cell gives its
  output (``display(Markdown(f"..."))`` to quote measured values, or printed text). Without such a cell,
  the notebook metadata ``{"kvlab": {"conclusion": "..."}}``; without that, the notebook's opening
  paragraph, marked as such on the page.
- **Thumbnail**: the first image output of the cell tagged ``thumbnail``, else the notebook's first image.
- **Checks**: every ``assert`` statement of a code cell counts once. A cell papermill ran to the end
  passed all of its checks; the failing cell's ``AssertionError`` is one failed check, and everything
  after it did not run.
"""

from __future__ import annotations

import ast
import base64
import re
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

CONCLUSION_TAG = "conclusion"
THUMBNAIL_TAG = "thumbnail"
_PAPERMILL_TAGS = {"papermill-error-cell-tag"}
PAPERMILL_ERROR_ID = "papermill-error-cell"


@dataclass
class Checks:
    """``assert`` statements by outcome."""

    passed: int = 0
    failed: int = 0
    not_run: int = 0

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.not_run

    def __add__(self, other: Checks) -> Checks:
        return Checks(self.passed + other.passed, self.failed + other.failed, self.not_run + other.not_run)


@dataclass
class NotebookSummary:
    """One executed notebook, as the landing page and the tests see it."""

    name: str  # file stem, e.g. "01_reproduce"; the page is ``name + ".html"``
    title: str
    seconds: float | None
    error: str | None  # "AssertionError: ..." of the failing cell, None when it ran to the end
    error_anchor: str | None  # id of papermill's marker before the failing cell, when there is one
    checks: Checks
    conclusion: str  # one paragraph of markdown
    conclusion_from: str  # "cell", "metadata" or "opening"
    thumbnail: bytes | None = field(repr=False)  # PNG
    parameters: dict[str, object]

    @property
    def ok(self) -> bool:
        return self.error is None


def _cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if not _PAPERMILL_TAGS & set(c.metadata.get("tags", []))]


def _tagged(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode | None:
    return next((c for c in _cells(nb) if tag in c.metadata.get("tags", [])), None)


def title(nb: nbformat.NotebookNode, default: str) -> str:
    """The notebook's first markdown heading (what Sphinx also uses as the page title)."""
    for cell in _cells(nb):
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if re.match(r"#{1,6}\s", line):
                    return line.lstrip("#").strip()
    return default


def _python_source(source: str) -> str:
    """A code cell's source without IPython magics and shell escapes, which ``ast`` cannot parse."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def count_asserts(source: str) -> int:
    """``assert`` statements in a code cell (each counts once, also inside a loop); 0 if it does not parse."""
    try:
        tree = ast.parse(_python_source(source))
    except SyntaxError:
        return 0
    return sum(isinstance(node, ast.Assert) for node in ast.walk(tree))


def _error_output(cell: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
    return next((o for o in cell.get("outputs", []) if o.output_type == "error"), None)


def checks(nb: nbformat.NotebookNode) -> Checks:
    """Count the notebook's checks by outcome, from papermill's per-cell status (or the outputs)."""
    result = Checks()
    for cell in _cells(nb):
        if cell.cell_type != "code" or not (n := count_asserts(cell.source)):
            continue
        status = cell.metadata.get("papermill", {}).get("status")
        error = _error_output(cell)
        if status == "failed" or error is not None:
            failed = int(error is not None and error.ename == "AssertionError")
            result += Checks(0, failed, n - failed)
        elif status == "completed" or (status is None and cell.get("execution_count") is not None):
            result += Checks(n, 0, 0)
        else:
            result += Checks(0, 0, n)
    return result


def error(nb: nbformat.NotebookNode) -> str | None:
    """``"ename: evalue"`` of the first failing cell (first line, shortened), None when none failed."""
    for cell in _cells(nb):
        if cell.cell_type == "code" and (out := _error_output(cell)) is not None:
            first = (str(out.evalue).strip().splitlines() or [""])[0]
            return f"{out.ename}: {first[:200]}" if first else out.ename
    return None


def _one_paragraph(markdown: str) -> str:
    text = "\n".join(line for line in markdown.strip().splitlines() if not re.match(r"#{1,6}\s", line))
    return " ".join(text.strip().split("\n\n")[0].split())


def _cell_text(cell: nbformat.NotebookNode) -> str:
    if cell.cell_type == "markdown":
        return cell.source
    outputs = cell.get("outputs", [])
    for mime in ("text/markdown", "text/plain"):
        for out in outputs:
            if out.output_type in ("display_data", "execute_result") and mime in out.get("data", {}):
                return out.data[mime]
    return "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")


def conclusion(nb: nbformat.NotebookNode) -> tuple[str, str]:
    """The notebook's one-paragraph conclusion and where it came from (see the module docstring)."""
    cell = _tagged(nb, CONCLUSION_TAG)
    if cell is not None and (text := _one_paragraph(_cell_text(cell))):
        return re.sub(r"^(\*\*)?Conclusions?[.:]?(\*\*)?[.:]?\s+", "", text), "cell"  # the column says it already
    text = _one_paragraph(str(nb.metadata.get("kvlab", {}).get("conclusion", "")))
    if text:
        return text, "metadata"
    opening = _one_paragraph(next((c.source for c in _cells(nb) if c.cell_type == "markdown"), ""))
    return _shorten(opening), "opening"


def _shorten(text: str, limit: int = 240) -> str:
    """The sentences of markdown ``text`` that fit in ``limit`` visible characters (link targets do not
    count), at least the first; a first sentence too long is cut at a word, never inside a link or code."""
    visible = lambda t: len(re.sub(r"\]\([^)]*\)", "]", t))  # noqa: E731
    sentences = re.split(r"(?<=[.!?])\s+", text)
    kept = sentences[0]
    for sentence in sentences[1:]:
        if visible(kept) + 1 + visible(sentence) > limit:
            break
        kept += " " + sentence
    if visible(kept) <= limit:
        return kept
    words, cut = kept.split(" "), ""
    for word in words:
        if visible(f"{cut} {word}") > limit:
            break
        cut = f"{cut} {word}".strip()
    cut = re.sub(r"\[[^\]]*(\]\([^)]*)?$", "", cut)  # a link cut open
    if cut.count("`") % 2:
        cut = cut[:cut.rindex("`")]
    return cut.rstrip(" ,;:(") + " …"


def thumbnail(nb: nbformat.NotebookNode) -> bytes | None:
    """PNG bytes of the tagged thumbnail cell's first image, else of the notebook's first image."""
    tagged = _tagged(nb, THUMBNAIL_TAG)
    for cell in [tagged] if tagged is not None else _cells(nb):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if "image/png" in out.get("data", {}):
                return base64.b64decode(out.data["image/png"])
    return None


def parameters(nb: nbformat.NotebookNode) -> dict[str, object]:
    """The values the notebook ran with: its ``parameters`` cell's literals, then papermill's overrides."""
    values: dict[str, object] = {}
    cell = _tagged(nb, "parameters")
    if cell is not None:
        try:
            tree = ast.parse(_python_source(cell.source))
        except SyntaxError:
            tree = ast.Module(body=[], type_ignores=[])
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    values[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    values.update(nb.metadata.get("papermill", {}).get("parameters", {}))
    return values


def summarize(executed: Path) -> NotebookSummary:
    """Everything the landing page shows about one executed notebook."""
    nb = nbformat.read(executed, as_version=4)
    text, source = conclusion(nb)
    duration = nb.metadata.get("papermill", {}).get("duration")
    marked = any(f'id="{PAPERMILL_ERROR_ID}"' in c.source for c in nb.cells if c.cell_type == "markdown")
    failed = error(nb)
    return NotebookSummary(name=executed.stem, title=title(nb, executed.stem), seconds=duration, error=failed,
                           error_anchor=PAPERMILL_ERROR_ID if marked and failed else None, checks=checks(nb),
                           conclusion=text, conclusion_from=source, thumbnail=thumbnail(nb), parameters=parameters(nb))
