"""The server of ``leaky_server.py`` with the fix: the same model and cache, two lines changed.

1. The weights are frozen when the model is loaded (``requires_grad_(False)``): no op on them records a
   graph. This is where the incident's fix went: its loader stopped handing out trainable variables.
2. The loop runs under ``torch.inference_mode()``: even if a future loader forgets (1), nothing is
   recorded. Defence in depth.

    kvlab diagnose examples/fixed_server.py:run      # exit code 0: what the loop keeps is the cache
"""

from __future__ import annotations

import torch
from leaky_server import KVCache, TinyDecoder

torch.manual_seed(0)
model = TinyDecoder().eval().requires_grad_(False)  # fix 1: frozen weights, the same values as the leaky server's


def run(steps: int, device: str = "cpu") -> KVCache:
    """Greedy-decode ``steps`` tokens from token 0 and return the cache the server keeps for the session."""
    model.to(device)
    cache = KVCache()
    token = torch.zeros(1, 1, dtype=torch.long, device=device)  # (B, T)
    with torch.inference_mode():  # fix 2: no graph is recorded, whatever the weights
        for _ in range(steps):
            logits = model(token, cache)
            token = logits[:, -1:].argmax(dim=-1)
    return cache
