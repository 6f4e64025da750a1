"""``python -m kvlab``: the same as the ``kvlab`` command."""

from .cli import main

raise SystemExit(main())
