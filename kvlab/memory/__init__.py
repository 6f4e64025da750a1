"""Memory tools for any PyTorch decode loop: what is alive, where it was allocated, and why it stays.

They import torch, the standard library and their own third-party needs, and nothing else of kvlab,
so they work on a transformers model or a hand-written loop exactly as on kvlab's own model:

- :class:`MemoryTracer` (:mod:`.trace`): exact live tensor bytes per decode step, attributed to the
  innermost ``torch.profiler.record_function`` region, else the module path, else the Python line;
- :func:`explain` (:mod:`.retention`): walks the autograd graph hanging off what the loop keeps and
  says which leaves require grad, how many steps are chained and which ops saved what;
- :func:`check_decode_leak` (:mod:`.leakguard`): a pass/fail check for tests and CI;
- :func:`validate_model` (:mod:`.validate`): parameters requiring grad, broken ties, meta weights ...;
- :class:`MemoryMonitor` (:mod:`.monitor`), :func:`rss_timeline` (:mod:`.rss`) and
  :func:`cuda_memory_snapshot` (:mod:`.cuda`) for the process-level and allocator-level views.

``pytest_plugins = ["kvlab.memory.pytest_plugin"]`` gives a test suite the ``leak_guard`` fixture.
"""

from .cuda import cuda_memory_snapshot
from .graph import GraphWalk, collect_tensors, walk_graph
from .leakguard import DecodeLeakError, LeakReport, Retained, check_decode_leak, compare_retained, measure_retained
from .monitor import Alarm, MemoryMonitor
from .retention import RetentionReport, SavedTensorTags, explain, tag_saved_tensors
from .rss import rss_timeline, rss_vs_exact
from .trace import MemoryTracer, TracerError, TracerWarning, trace_memory
from .units import GiB, MiB, fmt_bytes
from .validate import ModelValidationError, validate_model

__all__ = [
    "Alarm", "DecodeLeakError", "GiB", "GraphWalk", "LeakReport", "MemoryMonitor", "MemoryTracer", "MiB",
    "ModelValidationError", "Retained", "RetentionReport", "SavedTensorTags", "TracerError", "TracerWarning",
    "check_decode_leak", "collect_tensors", "compare_retained", "cuda_memory_snapshot", "explain", "fmt_bytes",
    "measure_retained", "rss_timeline", "rss_vs_exact", "tag_saved_tensors", "trace_memory", "validate_model",
    "walk_graph",
]
