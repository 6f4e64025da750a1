"""``gqa``: the ``static`` cache read by grouped-query attention, which never builds repeat_kv copies."""

from __future__ import annotations

import torch

from kvlab.caches.static import StaticCache


class GroupedCache(StaticCache):
    """``static`` storage read by grouped attention: each KV head serves its query group directly, so
    attention never materialises repeat_kv copies. The cache is exactly as large as ``static``; the
    saving (a factor ``n_rep`` = H / Hkv) is in attention's per-step working set, not in ``nbytes``.

    It returns only the written prefix by default (``trim=True``), so attention reads exactly the K/V
    that exist: with ``concat`` + repeat_kv reading n_rep copies of the same span, the per-step K/V
    working set is 1/n_rep of that. How the model attends with it: :meth:`kvlab.model.Attention.forward`.
    """

    kind = "gqa"
    grouped = True

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_tokens: int,
                 *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 trim: bool = True, uniform_positions: bool = False) -> None:
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, max_tokens, device=device, dtype=dtype,
                         trim=trim, uniform_positions=uniform_positions)
