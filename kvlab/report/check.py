"""Check a rendered site the way a reader would meet it offline.

Every page has its own ``<title>``; every local link, image, script and stylesheet resolves to a file
(and a ``#fragment`` to an id on that page); nothing a page *loads* (scripts, stylesheets, images,
frames, fonts in inline styles) comes from the network. Links to other sites (``<a href="https://...">``)
are fine: following one is the reader's choice. ``make report`` runs this after every render.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

# (tag, attribute) pairs whose URL the browser fetches by itself when the page opens
_LOADED = {("script", "src"), ("img", "src"), ("iframe", "src"), ("source", "src"),
           ("video", "src"), ("audio", "src"), ("embed", "src"), ("object", "data"), ("input", "src")}
_FETCHED_RELS = {"stylesheet", "preload", "modulepreload", "icon", "manifest"}
_CSS_URL = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])(https?:)?//""", re.I)
_MODULE_IMPORT = re.compile(r"""\bimport\b[^;'"]*['"](https?:)?//""")


@dataclass
class Page:
    """What the checker reads from one HTML file."""

    title: str = ""
    ids: set[str] = field(default_factory=set)
    loads: list[str] = field(default_factory=list)  # URLs fetched on opening
    links: list[str] = field(default_factory=list)  # <a href> targets
    inline: list[str] = field(default_factory=list)  # <style> and <script> bodies


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        for key in ("id", "name"):
            if values.get(key) and (key == "id" or tag == "a"):
                self.page.ids.add(values[key])
        if tag == "link" and values.get("href"):  # stylesheets and icons load; next/prev/search are links
            fetched = _FETCHED_RELS & set(values.get("rel", "").lower().split())
            (self.page.loads if fetched else self.page.links).append(values["href"])
        for attr, value in values.items():
            if (tag, attr) in _LOADED and value:
                self.page.loads.append(value)
        if tag == "a" and values.get("href"):
            self.page.links.append(values["href"])
        if "style" in values:
            self.page.inline.append(values["style"])
        self._in = tag if tag in ("title", "style", "script") else None

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "title":
            self.page.title += data
        elif self._in in ("style", "script"):
            self.page.inline.append(data)


def read_page(path: Path) -> Page:
    reader = _Reader()
    reader.feed(path.read_text(encoding="utf-8", errors="replace"))
    reader.page.title = " ".join(reader.page.title.split())
    return reader.page


def _remote(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https") or url.startswith("//")


def _fetches(text: str) -> bool:
    """Whether CSS or JavaScript text imports a stylesheet, font or module from another host."""
    return bool(_CSS_URL.search(text) or _MODULE_IMPORT.search(text))


def check_site(root: Path, pages: list[Path] | None = None) -> list[str]:
    """Problems found in the site under ``root``, one line each; [] when clean.

    ``pages`` default to every ``*.html`` outside folders named ``_*`` or ``.*`` (the theme's template
    fragments under ``_static`` are not pages).
    """
    root = root.resolve()
    if pages is None:
        pages = [p for p in root.rglob("*.html")
                 if not any(part.startswith(("_", ".")) for part in p.relative_to(root).parts[:-1])]
    pages = sorted(pages)
    read = {p.resolve(): read_page(p) for p in pages}
    problems: list[str] = []
    fetching: dict[Path, bool] = {}  # static CSS/JS files read once, whichever page loads them
    titles = Counter(page.title for page in read.values())
    for path, page in read.items():
        where = path.relative_to(root).as_posix()
        if not page.title:
            problems.append(f"{where}: no <title>")
        elif titles[page.title] > 1:
            problems.append(f"{where}: title {page.title!r} is shared with another page")
        problems += [f"{where}: loads {url} from the network" for url in page.loads if _remote(url)]
        problems += [f"{where}: inline style or script loads from the network"
                     for text in page.inline if _fetches(text)]
        for url in page.loads + page.links:
            parts = urlsplit(url)
            if parts.scheme or url.startswith("//") or url.startswith("data:"):
                continue
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                problems.append(f"{where}: {url} does not resolve")
            elif url in page.loads and target.suffix in (".css", ".js"):
                if target not in fetching:
                    fetching[target] = _fetches(target.read_text(encoding="utf-8", errors="replace"))
                if fetching[target]:
                    problems.append(f"{where}: {url} loads from the network")
            elif parts.fragment and target.suffix == ".html":
                ids = read[target].ids if target in read else read_page(target).ids
                if unquote(parts.fragment) not in ids:
                    problems.append(f"{where}: {url}: no id {parts.fragment!r} on that page")
    return problems
