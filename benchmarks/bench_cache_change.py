"""Performance test for KV-cache changes: run it before and after touching a cache.

    python benchmarks/bench_cache_change.py --save-baseline before.json   # on the old code
    python benchmarks/bench_cache_change.py --baseline before.json        # on the new code

The same as ``python -m kvlab.study.cachecheck`` (see its docstring for what is measured and when it
fails): kept here so that the benchmarks folder lists every benchmark kvlab has.
"""

from __future__ import annotations

from kvlab.study.cachecheck import main

if __name__ == "__main__":
    raise SystemExit(main())
