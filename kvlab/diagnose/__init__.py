"""Diagnose your own decode loop: why does it keep memory, and does the fix work?

No allocation profiler (memray, heaptrack, PyTorch's memory snapshot, the profiler) says why memory
stays alive; kvlab's memory tools can, and this package runs them all on one loop and writes a report
to read and share. From the command line::

    kvlab diagnose path/to/server.py:run --tokens 64 --out reports/my-loop
    kvlab diagnose --hf path/to/checkpoint            # a Hugging Face causal LM, decoded greedily

From Python, ``diagnose(run)`` on any callable ``run(steps) -> kept`` (the leak guard's contract)
returns a :class:`Diagnosis`: the verdict, kept bytes against tokens with the fitted growth law,
attribution by region, the retention explanation, model validation and the fix verified.

Modules: :mod:`.target` (finding the loop), :mod:`.hf` (the ``--hf`` loop, the only place transformers
is imported), :mod:`.measure` (running and measuring), :mod:`.findings` (the sentences),
:mod:`.results` (CSV/JSON), :mod:`.figures` (the report's plots), :mod:`.command` (the CLI).
"""

from __future__ import annotations

from .command import main
from .hf import hf_target
from .measure import diagnose, lengths_for
from .results import Diagnosis
from .target import BadTarget, Target, load_target, target_from_callable

__all__ = ["diagnose", "lengths_for", "Diagnosis", "BadTarget", "Target", "load_target", "target_from_callable",
           "hf_target", "main"]

