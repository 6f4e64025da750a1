"""``python -m kvlab.experiments``: the GPU-scale suites (see :mod:`kvlab.experiments.suites`)."""
import sys

from kvlab.experiments.suites import main

sys.exit(main())
