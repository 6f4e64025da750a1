"""``python -m kvlab.experiments``: the GPU-scale suites (see :mod:`kvlab.experiments`)."""

from kvlab.experiments.command import main

raise SystemExit(main())
