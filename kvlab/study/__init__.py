"""The study: kvlab's investigation, built on the core (the model, its loaders and caches) and on the
memory tools of :mod:`kvlab.memory`. The notebooks, ``kvlab reproduce``, ``kvlab demo``, the GPU
experiments and the benchmarks all measure through it.

Measured runs
    :mod:`.runs` (ONE measured decode run: :func:`~kvlab.study.runs.measure`, and
    :func:`~kvlab.study.runs.measure_decode` from a checkpoint), :mod:`.probes` (what is read at every
    step, and the one prompt recipe), :mod:`.hf` (transformers' model and greedy loop beside kvlab's),
    :mod:`.isolated` (a run in a fresh process), :mod:`.env` (cleanup between runs, model bytes).
Runs side by side
    :mod:`.tables` (several runs as tables), :mod:`.sweeps` (the cache designs), :mod:`.cachecheck`
    (the before/after performance test of a cache change), :mod:`.reproduce` (``kvlab reproduce``),
    :mod:`.controls` (control experiments), :mod:`.explorer` (loader x cache x tokens x batch, live in
    JupyterLab), :mod:`.guard_demo` (the leak guard as a pytest file, run by notebook 4).
Models, records and figures
    :mod:`.memmodel` (the analytic memory model), :mod:`.records` (the one metadata writer),
    :mod:`.results` (readers of recorded results), :mod:`.plotting`, :mod:`.figures`,
    :mod:`.cachefigs`, :mod:`.palette`.

Nothing is imported here: ``import kvlab.study.memmodel`` costs only what that module needs.
"""
