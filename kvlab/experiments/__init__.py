"""Real-scale experiments: the leak, the fix and the fast path at the Mistral-7B shape on one GPU.

``python -m kvlab.experiments --preset mistral-7b --device cuda --out DIR`` builds the model with
seeded random weights drawn directly on the device (values don't matter for memory or speed), then runs
the suites named by ``--suites``:

- ``bandwidth``: device-to-device copy bandwidth, the denominator of the decode roofline.
- ``parity``: max |logit difference| against transformers on the same weights, per dtype.
- ``compare``: eager kvlab decode (frozen weights) with every cache, timed token by token.
- ``fast``: the compiled decode path of :mod:`kvlab.fastpath`; tokens/s against the roofline.
- ``hf``: transformers' ``MistralForCausalLM`` over the *same* weight tensors: decode
  speed and peak memory with ``DynamicCache``/``StaticCache`` (hand-written loop and ``generate``), and
  its own leak when driven with grad enabled.
- ``hf-compile``: transformers' compiled static-cache ``generate``.
- ``leak``: decode until OOM or a token cap for each dtype × loader × cache (``--runs`` or the grid).
- ``incident``: traced runs at the incident's length (~140 tokens): live bytes by region.

Every decode step of every run is one row of ``steps.csv`` (memory, peak since the previous step, time,
and with ``--trace`` the exact live bytes by ``record_function`` region); ``runs.csv`` has one row
per run; ``meta.json`` holds the environment, the command, the config and the suite-level results. All
three are rewritten after every run, so an interrupted session still leaves its data. An out-of-memory
error ends that run only: the step is recorded, memory is freed, the next run starts.

On a CPU the same entry point runs at small scale (``--preset tiny --device cpu --tokens 64``); CUDA's
allocator counters are then empty and ``live_bytes`` (always traced on CPU) is the memory measure.

``--summarize DIR [DIR ...] --out OUT`` runs nothing: it reads result folders and sets them against the
analytic model of :mod:`kvlab.study.memmodel` (``leak_vs_model.csv``, ``incident_by_site.csv``,
``summary.json``).

Modules: :mod:`.runner` (one measured, recorded run), :mod:`.speed` (bandwidth, compare, fast,
hf-compile), :mod:`.transformers_suites` (parity, hf), :mod:`.leak` (leak, incident), :mod:`.summary`
(``--summarize``), :mod:`.command` (options and the session).
"""
