"""KV caches: one small interface (:mod:`kvlab.caches.base`), one file per design, registered here.

The designs, and the one thing each changes (diff their files to see it):

========  ==================================================================  =====================
kind      storage                                                             ``nbytes`` counts
========  ==================================================================  =====================
concat    one tensor per layer, regrown with ``torch.cat`` every step           tokens
static    preallocated (B, Hkv, max_tokens, D), written in place by position    max_tokens
gqa       ``static`` storage, read by grouped attention (no repeat_kv copies)   max_tokens
sliding   ring of ``sliding_window`` slots, slot = position % window            min(tokens, window)
int8      ``concat`` storage in int8 + a float32 scale per (token, KV head)     tokens (int8 + scales)
paged     pool of fixed-size blocks + a block table per sequence                whole blocks in use
========  ==================================================================  =====================

None of them detaches anything: under autograd (trainable weights) every cache carries the graph of
every step that wrote into it, which is the point the notebooks make -- the cache design changes how
much a step keeps alive, never whether the graph is kept.

Ragged batches (rows with different prompt lengths): the designs with ``ragged = True`` take per-row
positions; :func:`kvlab.generate.generate_ragged` prefills each row through
:meth:`~kvlab.caches.base.KVCache.for_sequence`, then decodes all rows together.

To add a design: a file with a :class:`~kvlab.caches.base.KVCache` subclass that sets ``kind`` and
implements ``from_config``, ``nbytes_for``, ``update``, ``reset``, ``seq_len`` and ``tensors``; then one
entry in :data:`CACHES`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch

from kvlab.caches.base import KVCache
from kvlab.caches.concat import ConcatCache
from kvlab.caches.gqa import GroupedCache
from kvlab.caches.int8 import INT8_SCALE_BYTES, Int8Cache
from kvlab.caches.paged import PagedCache
from kvlab.caches.sliding import SlidingWindowCache
from kvlab.caches.static import StaticCache
from kvlab.config import MistralConfig

__all__ = ["CACHES", "EXACT_CACHES", "INT8_SCALE_BYTES", "ConcatCache", "GroupedCache", "Int8Cache", "KVCache",
           "PagedCache", "SlidingWindowCache", "StaticCache", "kv_bytes", "make_cache"]

#: Every design by name: the one place a design is registered.
CACHES: dict[str, type[KVCache]] = {cls.kind: cls for cls in (
    ConcatCache, StaticCache, GroupedCache, SlidingWindowCache, Int8Cache, PagedCache)}
#: Designs whose tokens equal the no-cache run's exactly (``int8`` rounds K/V).
EXACT_CACHES: tuple[str, ...] = tuple(kind for kind, cls in CACHES.items() if cls.exact)


def _design(kind: str) -> type[KVCache]:
    try:
        return CACHES[kind]
    except KeyError:
        raise ValueError(f"unknown cache {kind!r}; choose from {sorted(CACHES)}") from None


def make_cache(kind: str, config: MistralConfig, batch_size: int = 1, max_tokens: int | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None, **options: Any) -> KVCache:
    """Build a cache by name (see :data:`CACHES`). ``max_tokens`` (prompt + new tokens) sizes the
    preallocated designs (required by ``static``/``gqa``, sizes ``paged``'s initial pool). ``options``
    go to the class: ``trim`` for static/gqa, ``block_size``/``num_blocks`` for paged."""
    return _design(kind).from_config(config, batch_size, max_tokens, device, dtype or config.dtype, **options)


def kv_bytes(config: MistralConfig, batch: int, tokens: int | Sequence[int], dtype: torch.dtype | None = None,
             kind: str = "concat", *, max_tokens: int | None = None, **options: Any) -> int:
    """Bytes of K/V a ``kind`` cache holds for ``batch`` sequences of ``tokens`` positions each (or one
    length per sequence, for ragged batches): equal to that cache's ``nbytes``, by the design's own
    formula (:meth:`~kvlab.caches.base.KVCache.nbytes_for`). ``max_tokens`` and ``options``
    (``block_size`` for paged) are those :func:`make_cache` takes."""
    design = _design(kind)
    # operator.index: numpy integers (e.g. from np.arange) are welcome, floats are not.
    if isinstance(tokens, Sequence):
        lengths = [operator.index(t) for t in tokens]
    else:
        lengths = [operator.index(tokens)] * batch
    if len(lengths) != batch:
        raise ValueError(f"got {len(lengths)} sequence lengths for batch {batch}")
    return design.nbytes_for(config, lengths, dtype or config.dtype, max_tokens=max_tokens, **options)
