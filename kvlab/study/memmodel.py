"""Predict memory from the config alone: weights, KV cache, one step's transient, and the leak.

The leak model is derived by counting what autograd saves for backward in kvlab's model (see
:func:`saved_tensors`) when the weights require grad, and which of those tensors stay reachable
through the concat cache's ``grad_fn`` chain. Per layer and step, with T new tokens and S cached
positions after the update:

- RMSNorm (twice): its float32 input, the rsqrt per row, the normalised input, and its output (saved
  by the next linear): ``3*T*C`` elements and ``T`` rsqrt values, roughly.
- attention: the rotated query (``T*H*D``), the repeat_kv'd K and V (``H*S*D`` each — the big ones;
  see below when they are not copies), the bool mask (``T*S`` bytes), the float32 softmax output
  (``H*T*S``; plus a copy in the model dtype if that is not float32), the attention output fed to
  ``o_proj`` (``T*H*D``) and a 0-dim float64 holding the score scale.
- MLP: ``gate`` output (SiLU input), SiLU output, ``up`` output, their product (``down_proj`` input):
  ``4*T*I``.
- per step, shared by the layers: rotary ``cos`` and ``sin`` (``T*D`` each) and the token ids the
  embedding saved — a view of the whole token tensor, ``8*(prompt+step)`` bytes.

What stays alive: each step's cache is reachable from the next one, and through it the K/V
projections' inputs, hence everything upstream — every layer but the last in full, and the last layer
only up to its cache update (its attention and MLP feed only the logits, which the loop drops). The
final step is kept whole by the last logits. The ``H*S*D`` terms make the total quadratic in tokens.

When K and V are copies (:func:`repeated_kv`): kvlab's ``repeat_kv`` copies only when there are
several KV heads and several query heads per KV head. With ``n_rep == 1`` (multi-head attention) it
returns its input, and with one KV head (multi-query) its expand + reshape stays a view (the repeated
head dimension has stride 0). The attention matmuls then save a view of the step's cache itself
(``Hkv*S*D``), and the last step's cache is what the loop keeps, not a saved tensor. One exception:
with one KV head and a batch of more than one sequence, the matmul's own batched reshape cannot keep
the stride-0 view and makes the ``H*S*D`` copy instead (allocated in ``attention``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from kvlab.caches import kv_bytes
from kvlab.config import MistralConfig, dtype_named

__all__ = [
    "dtype_bytes", "weight_bytes", "weight_breakdown", "repeated_kv", "saved_tensors", "leak_bytes",
    "leak_by_site", "leak_curve", "step_transient_bytes", "GrowthFit", "fit_growth",
]


def dtype_bytes(dtype: torch.dtype | str | None, config: MistralConfig | None = None) -> int:
    """Bytes per element of ``dtype`` (a torch dtype or a config name); ``None`` means the config's dtype."""
    if dtype is None:
        if config is None:
            raise ValueError("dtype_bytes(None) needs a config")
        dtype = config.dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------- weights
def weight_breakdown(config: MistralConfig, dtype: torch.dtype | str | None = None,
                     quant: str | None = None) -> dict[str, int]:
    """Bytes of each kind of weight. ``quant="int8"``: every linear (``lm_head`` too) stored as int8 with
    one float32 scale per output channel, as :func:`kvlab.quant.quantize_linears` does; embeddings and
    norms stay in ``dtype``. Includes the rotary ``inv_freq`` buffer (float32)."""
    e = dtype_bytes(dtype, config)
    c, i, h, hkv, d, v, n = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                             config.num_key_value_heads, config.head_dim, config.vocab_size,
                             config.num_hidden_layers)
    linears = [(h * d, c), (hkv * d, c), (hkv * d, c), (c, h * d), (i, c), (i, c), (c, i)] * n
    if not config.tie_word_embeddings or quant == "int8":  # int8 gives a tied head its own int8 copy
        linears.append((v, c))
    if quant is None:
        linear_bytes = sum(o * k for o, k in linears) * e
    elif quant == "int8":
        linear_bytes = sum(o * k + 4 * o for o, k in linears)
    else:
        raise ValueError(f"quant must be None or 'int8', got {quant!r}")
    return {
        "embeddings": v * c * e,
        "linears": linear_bytes,
        "norms": (2 * n + 1) * c * e,
        "rotary_buffer": (d // 2) * 4,
    }


def weight_bytes(config: MistralConfig, dtype: torch.dtype | str | None = None, quant: str | None = None) -> int:
    """Total bytes of a model's parameters and buffers (see :func:`weight_breakdown`)."""
    return sum(weight_breakdown(config, dtype, quant).values())


# --------------------------------------------------------------------------------------------- leak
SavedRow = tuple[str, str, str, str, int]  # name, site, scope, part, bytes


def repeated_kv(config: MistralConfig, batch: int = 1) -> tuple[int, str]:
    """(heads, site) of the K and V that attention saves: ``(H, "repeat_kv")`` when repeat_kv copies
    them; ``(H, "attention")`` when repeat_kv returns a view but the matmul's batched reshape copies
    (one KV head, batch > 1); ``(Hkv, "cache")`` when what is saved is a view of the step's cache."""
    h, hkv = config.num_attention_heads, config.num_key_value_heads
    if h == hkv or (hkv == 1 and batch == 1):
        return hkv, "cache"
    return h, ("attention" if hkv == 1 else "repeat_kv")


def _saved_rows(config: MistralConfig, new: int, cached: int, tokens_so_far: int, batch: int, e: int) -> list[SavedRow]:
    """The rows of :func:`saved_tensors` as plain tuples, ``e`` bytes per element of the model dtype."""
    b, t, s = batch, new, cached
    c, i, h, d = config.hidden_size, config.intermediate_size, config.num_attention_heads, config.head_dim
    kv_heads, kv_site = repeated_kv(config, batch)
    kv_part = "cache" if kv_site == "cache" else "post-cache"  # "cache": the step's cache itself, see _retained_step
    # In float32 the norms' "float32 input" is the residual stream itself, computed by the previous
    # block (embedding, attention or MLP); in other dtypes it is a float32 copy made by the norm.
    stream = "residual" if e == 4 else "norm"
    return [
        # name, site, scope, part, bytes
        ("input norm: float32 input", stream, "layer", "pre-cache", b * t * c * 4),
        ("input norm: rsqrt", "norm", "layer", "pre-cache", b * t * 4),
        ("input norm: normalised input", "norm", "layer", "pre-cache", b * t * c * e),
        ("input norm output (q/k/v_proj input)", "norm", "layer", "pre-cache", b * t * c * e),
        ("query after rotary", "attention", "layer", "post-cache", b * t * h * d * e),
        ("K after repeat_kv", kv_site, "layer", kv_part, b * kv_heads * s * d * e),
        ("V after repeat_kv", kv_site, "layer", kv_part, b * kv_heads * s * d * e),
        ("score scale (0-dim float64)", "attention", "layer", "post-cache", 8),
        ("attention mask (bool)", "attention", "layer", "post-cache", b * t * s),
        ("softmax output (float32)", "attention", "layer", "post-cache", b * h * t * s * 4),
        ("probabilities in model dtype", "attention", "layer", "post-cache", b * h * t * s * e if e != 4 else 0),
        ("attention output (o_proj input)", "attention", "layer", "post-cache", b * t * h * d * e),
        ("post-attention norm: float32 input", stream, "layer", "post-cache", b * t * c * 4),
        ("post-attention norm: rsqrt", "norm", "layer", "post-cache", b * t * 4),
        ("post-attention norm: normalised input", "norm", "layer", "post-cache", b * t * c * e),
        ("post-attention norm output (gate/up input)", "norm", "layer", "post-cache", b * t * c * e),
        ("gate_proj output (SiLU input)", "mlp", "layer", "post-cache", b * t * i * e),
        ("SiLU output", "mlp", "layer", "post-cache", b * t * i * e),
        ("up_proj output", "mlp", "layer", "post-cache", b * t * i * e),
        ("SiLU * up (down_proj input)", "mlp", "layer", "post-cache", b * t * i * e),
        ("rotary cos", "rotary", "step", "pre-cache", b * t * d * e),
        ("rotary sin", "rotary", "step", "pre-cache", b * t * d * e),
        ("token ids (embedding indices)", "tokens", "step", "pre-cache", b * tokens_so_far * 8),
        # The final norm saves a slice of the last residual: for float32 that is the whole (B, T, C)
        # tensor; otherwise its float32 copy of the last position only.
        ("final norm: float32 input", stream, "final", "post-cache", b * c * 4 * (t if e == 4 else 1)),
        ("final norm: rsqrt", "norm", "final", "post-cache", b * 4),
        ("final norm: normalised input", "norm", "final", "post-cache", b * c * e),
        ("final norm output (lm_head input)", "norm", "final", "post-cache", b * c * e),
    ]


def saved_tensors(config: MistralConfig, new: int, cached: int, *, tokens_so_far: int | None = None,
                  batch: int = 1, dtype: torch.dtype | str | None = None) -> pd.DataFrame:
    """What autograd saves in one forward step of kvlab's model with trainable weights.

    ``new`` tokens are processed with ``cached`` positions in the cache after the update (the prefill
    has ``new == cached == prompt length``; a decode step has ``new == 1``). ``tokens_so_far`` is the
    length of the token tensor the step's input is sliced from (default ``cached``).

    Returns one row per saved tensor kind: ``name, site, scope`` (``"layer"``: once per layer;
    ``"step"``: once per step; ``"final"``: final norm and ``lm_head``), ``part`` (``"pre-cache"``:
    upstream of the layer's cache update, so reachable from the cache; ``"post-cache"``: reachable only
    through later layers or the logits; ``"cache"``: a view of the step's cache, see
    :func:`repeated_kv`) and ``bytes``.
    """
    n_tokens = cached if tokens_so_far is None else tokens_so_far
    rows = _saved_rows(config, new, cached, n_tokens, batch, dtype_bytes(dtype, config))
    return pd.DataFrame(rows, columns=["name", "site", "scope", "part", "bytes"])


def _retained_step(config: MistralConfig, step: int, prompt_len: int, batch: int, e: int, last: bool,
                   total: dict[str, int]) -> None:
    """Add the bytes retained from decode step ``step`` (0: the prefill) to ``total``, by site.

    Every step but the last keeps its layers' saved tensors except the last layer's post-cache part,
    and its per-step tensors; the last step is kept whole (final norm included) by the last logits,
    except the views of its own cache: that cache is what the loop keeps, not a saved tensor.
    """
    new, cached = (prompt_len, prompt_len) if step == 0 else (1, prompt_len + step)
    n_layers = config.num_hidden_layers
    for _, site, scope, part, nbytes in _saved_rows(config, new, cached, cached, batch, e):
        if part == "cache":
            weight = 0 if last else n_layers - 1
        elif scope == "layer":
            weight = n_layers if last or part == "pre-cache" else n_layers - 1
        else:
            weight = 1 if last or scope == "step" else 0
        total[site] = total.get(site, 0) + nbytes * weight


def _leak_by_site_for(config: MistralConfig, counts: Sequence[int], prompt_len: int, batch: int,
                      dtype: torch.dtype | str | None) -> dict[int, dict[str, int]]:
    """:func:`leak_by_site` for every generated count in ``counts``, summing each step once: the steps
    before a run's last are the same for every longer run."""
    if any(n < 1 for n in counts) or prompt_len < 1:
        raise ValueError("new_tokens and prompt_len must be at least 1")
    e = dtype_bytes(dtype, config)
    earlier: dict[str, int] = {}  # retained from steps 0 .. done-1, none of them the last
    done = 0
    out: dict[int, dict[str, int]] = {}
    for n in sorted(set(counts)):
        for step in range(done, n - 1):
            _retained_step(config, step, prompt_len, batch, e, False, earlier)
        done = max(done, n - 1)
        total = dict(earlier)
        _retained_step(config, n - 1, prompt_len, batch, e, True, total)
        out[n] = {site: total[site] for site in sorted(total) if total[site]}
    return out


def leak_by_site(config: MistralConfig, new_tokens: int, prompt_len: int = 1, batch: int = 1,
                 dtype: torch.dtype | str | None = None) -> dict[str, int]:
    """Predicted bytes of saved tensors still alive after ``generate(prompt, new_tokens)`` with trainable
    weights and the concat cache, by the site that allocated them."""
    return _leak_by_site_for(config, [new_tokens], prompt_len, batch, dtype)[new_tokens]


def leak_bytes(config: MistralConfig, new_tokens: int, prompt_len: int = 1, batch: int = 1,
               dtype: torch.dtype | str | None = None) -> int:
    """Predicted bytes that autograd keeps alive after ``generate(prompt, new_tokens)`` (trainable
    weights, concat cache, grad enabled), parameters and the cache itself not included."""
    return sum(leak_by_site(config, new_tokens, prompt_len, batch, dtype).values())


def leak_curve(config: MistralConfig, tokens: Iterable[int], prompt_len: int = 1, batch: int = 1,
               dtype: torch.dtype | str | None = None) -> pd.DataFrame:
    """Predicted leak and KV cache for several lengths: ``tokens, leak_bytes, kv_cache_bytes`` (the
    concat cache's bytes, :func:`kvlab.caches.kv_bytes`)."""
    tokens = list(tokens)
    by_site = _leak_by_site_for(config, tokens, prompt_len, batch, dtype) if tokens else {}
    kv_dtype = dtype_named(dtype) if isinstance(dtype, str) else dtype
    rows = [dict(tokens=n, leak_bytes=sum(by_site[n].values()),
                 kv_cache_bytes=kv_bytes(config, batch, prompt_len + n - 1, kv_dtype)) for n in tokens]
    return pd.DataFrame(rows, columns=["tokens", "leak_bytes", "kv_cache_bytes"])


def step_transient_bytes(config: MistralConfig, cached: int, batch: int = 1,
                         dtype: torch.dtype | str | None = None) -> int:
    """Estimated peak of one decode step above what was alive before it (frozen weights, concat cache,
    repeat_kv attention), the largest of three moments, each on top of the residual stream:

    - attention's output is allocated with the copied K and V (two when repeat_kv copies, one when only
      the matmul copies, none when it saves views: see :func:`repeated_kv`), the masked scores, the
      float32 softmax, the query, the output and the mask alive together;
    - a layer's cache update, where ``cat`` holds the old and the new K (then V) of that layer at once;
    - the MLP, whose SiLU output, ``up`` output and their product meet before ``down_proj``.

    The first dominates with grouped-query attention at any context length (within 3% of the exact
    tracer on the tiny preset); with multi-head or multi-query attention at batch 1 nothing is copied
    and the other two decide, and the small tensors alive beside them (projections, other layers'
    growth), which are not modelled, leave the estimate up to 25% low at short contexts.
    ``cached`` is the cache length after the step's update."""
    e = dtype_bytes(dtype, config)
    b, s = batch, cached
    c, i, h, d = config.hidden_size, config.intermediate_size, config.num_attention_heads, config.head_dim
    copies = {"repeat_kv": 2, "attention": 1, "cache": 0}[repeated_kv(config, batch)[1]]
    scores = b * h * s * e + b * h * s * 4 + (0 if e == 4 else b * h * s * e)
    attention = copies * b * h * s * d * e + scores + b * s + 2 * b * h * d * e  # + mask, query, output
    cache_update = b * config.num_key_value_heads * s * d * e
    stream = 3 * b * c * e  # residual, normalised input, its output
    return max(attention, cache_update, 3 * b * i * e) + stream


# --------------------------------------------------------------------------------------------- growth law
@dataclass
class GrowthFit:
    """``value ≈ prefactor * tokens ** slope``, fitted on log-log axes."""

    slope: float
    prefactor: float
    tokens: np.ndarray
    values: np.ndarray

    def predict(self, tokens: Sequence[float] | np.ndarray | float) -> np.ndarray:
        return self.prefactor * np.asarray(tokens, dtype=float) ** self.slope

    @property
    def law(self) -> str:
        """The slope in words (:func:`growth_law`)."""
        return growth_law(self.slope)


def growth_law(slope: float) -> str:
    """A fitted log-log slope in words: ~0 constant (weights), 1 linear (a KV cache, or a leak that grows
    by the same amount each step), 2 quadratic (the incident's chained graph). Short runs of a quadratic
    leak read between the two, because each step's fixed-size activations add a linear part."""
    if slope < 0.5:
        kind = "constant"
    elif slope < 1.25:
        kind = "linear"
    elif slope < 1.75:
        kind = "between linear and quadratic"
    else:
        kind = "quadratic"
    return f"{kind} (slope {slope:.2f})"


def fit_growth(tokens: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray,
               min_tokens: float | None = None) -> GrowthFit:
    """Least-squares slope of log(value) against log(tokens).

    A leak of ``a*N**2 + b*N`` reads a little under 2 at small N, where the linear part still counts;
    ``min_tokens`` drops the short end. Non-positive values (nothing measured yet) are ignored.
    """
    x = np.asarray(tokens, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = (x > 0) & (y > 0)
    if min_tokens is not None:
        keep &= x >= min_tokens
    x, y = x[keep], y[keep]
    if len(x) < 2 or len(np.unique(x)) < 2:
        raise ValueError("fit_growth needs at least two distinct token counts with positive values")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return GrowthFit(slope=float(slope), prefactor=float(math.exp(intercept)), tokens=x, values=y)
