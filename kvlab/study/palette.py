"""One colour per loader, per cache design and per allocation site, for every figure of the suite.

Why a module: eight notebooks compare the same few things (four loaders, six cache designs, a
handful of model regions) in different figures. A reader who learned on the first figure that red is
the ``trainable`` loader must find it red in the last one, and never find red meaning something else.
matplotlib's default cycle gives colours by position in a list, so the same run changed colour
whenever a figure listed its runs in another order; every plot now asks this module instead.

Loaders and caches have disjoint colours, so a figure that mixes both (notebook 06) stays readable.
Reference lines (analytic models, K/V sizes, slope guides) are black or grey and dashed or dotted,
never a run colour. Sites get readable labels: ``repeat_kv (K/V copies)`` rather than
``kvlab/generate.py:76 generate``.
"""

from __future__ import annotations

import re

__all__ = ["LOADER_COLORS", "CACHE_COLORS", "SERIES_COLORS", "SITE_COLORS", "REFERENCE", "loader_color",
           "cache_color", "color_of", "site_label", "site_color", "DTYPE_STYLE"]

#: The four loaders of the story: the bug in warm colours, the clean loaders in cool ones.
LOADER_COLORS: dict[str, str] = {
    "trainable": "#d62728",  # red: weights as trainable parameters, the bug
    "threaded": "#ff7f0e",  # orange: the same, one thread per shard (the first, wrong fix)
    "inference": "#1f77b4",  # blue: frozen weights, the fix
    "int8": "#2ca02c",  # green: quantized linears, the "quantized models are fine" control
}

#: Cache designs (and the two controls that are not designs: no cache, a detaching cache).
CACHE_COLORS: dict[str, str] = {
    "concat": "#9467bd",  # purple
    "static": "#8c564b",  # brown
    "sliding": "#e377c2",  # pink
    "gqa": "#17becf",  # cyan
    "int8": "#bcbd22",  # olive (the int8 *cache*, not the int8 loader)
    "paged": "#7f7f7f",  # grey
    "none": "#000000",  # no cache at all (the incident's --no-kv-cache)
    "detach": "#0b5d5d",  # dark teal: a concat cache that detaches what it stores (a control)
}

#: Runs that are neither a kvlab loader nor a cache design.
SERIES_COLORS: dict[str, str] = {
    "transformers, grad on": "#7b1113",  # dark red: the same bug in transformers
    "transformers, no_grad": "#08306b",  # dark navy: transformers, clean
    "plain PyTorch, grad on": "#7b1113",
    "plain PyTorch, no_grad": "#08306b",
}

#: Style of reference lines: analytic model, K/V-cache size, slope guides.
REFERENCE: dict[str, dict[str, object]] = {
    "model": {"color": "black", "ls": "--", "lw": 1.2},
    "kv": {"color": "black", "ls": ":", "lw": 1.4},
    "guide": {"color": "0.55", "ls": "-.", "lw": 1.0},
    "limit": {"color": "0.35", "ls": "-", "lw": 0.9},
}

#: Line style per dtype, when a figure shows both (06): the colour stays the loader's or cache's.
DTYPE_STYLE: dict[str, str] = {"bfloat16": "-", "float16": "-", "float32": "--"}

_SITE_NAMES: dict[str, str] = {
    "repeat_kv": "repeat_kv (K/V copies)",
    "cache": "cache update (cat / write)",
    "attention": "attention (scores, softmax)",
    "mlp": "MLP",
    "norm": "RMSNorm",
    "embed": "embedding",
    "lm_head": "lm_head (logits)",
    "rotary_emb": "rotary embedding",
    "loop": "decode loop (token ids)",
    "other": "other",
}

SITE_COLORS: dict[str, str] = {  # a muted palette, distinct from the run colours above
    "repeat_kv": "#e6550d",
    "cache": "#756bb1",
    "attention": "#fdae6b",
    "mlp": "#74c476",
    "norm": "#9ecae1",
    "embed": "#c6dbef",
    "lm_head": "#fd8d3c",
    "rotary_emb": "#dadaeb",
    "loop": "#bdbdbd",
    "other": "#d9d9d9",
}

_FRAME = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+)\s+(?P<func>\S+)$")


def loader_color(loader: str) -> str:
    """The colour of a loader (``"trainable"`` ...); grey for a name this module does not know."""
    return LOADER_COLORS.get(loader, "#444444")


def cache_color(cache: str | None) -> str:
    """The colour of a cache design (``None`` means no cache)."""
    return CACHE_COLORS.get(cache or "none", "#444444")


def color_of(name: str, kind: str = "loader") -> str:
    """The colour of a run label: ``kind`` says which palette a bare name belongs to (``"loader"`` or
    ``"cache"``); labels of :data:`SERIES_COLORS` are recognised whatever ``kind`` says."""
    if name in SERIES_COLORS:
        return SERIES_COLORS[name]
    return cache_color(name) if kind == "cache" else loader_color(name)


def _site_key(site: str) -> str:
    """The region a tracer site belongs to: the innermost name of a ``a/b/c`` path, or ``loop`` for a
    Python frame outside any region (``kvlab/generate.py:76 generate``)."""
    site = str(site)
    if _FRAME.match(site):
        return "loop"
    return site.replace("/", ".").split(".")[-1] or site


def site_label(site: str) -> str:
    """A label a reader can parse: region names spelled out, Python frames as ``function() in file``."""
    site = str(site)
    frame = _FRAME.match(site)
    if frame:
        return f"{frame['func']}() in {frame['path'].rsplit('/', 1)[-1]}"
    return _SITE_NAMES.get(_site_key(site), site)


def site_color(site: str) -> str:
    return SITE_COLORS.get(_site_key(site), SITE_COLORS["other"])
