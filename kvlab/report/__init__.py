"""Execute the investigation notebooks and render them as a static site that opens offline.

The committed notebooks carry no outputs; this is the one command that fills them in. Each notebook is
executed by papermill; Sphinx (myst-nb, sphinx-book-theme) renders the executed notebooks into pages with
their own titles, working links, folded code and a landing page that says what was found before what
was run. Parameters given with ``-p name value`` go to every notebook's papermill ``parameters`` cell, so
the whole suite reruns at another scale or on a GPU (``-p preset small -p device cuda``).

Modules: ``execute`` (papermill), ``notebook`` (what a page's card says: title, checks, conclusion,
thumbnail), ``landing`` (the index page), ``build`` (Sphinx), ``snapshot`` (offline CUDA memory snapshot
pages), ``check`` (links, titles, nothing loaded from the network), ``cli`` (the command).
"""

from .cli import main

__all__ = ["main"]
