"""A CUDA memory snapshot page that opens without the network.

``torch.cuda._memory_viz.trace_plot`` writes a page that embeds the snapshot and imports PyTorch's
viewer, ``MemoryViz.js``, from a CDN; the viewer in turn imports d3 from another CDN. Neither script is
in the torch wheel, so pointing the page at a local copy is not possible on a machine with pip alone.
:func:`offline_snapshot` instead reads the snapshot the page embeds and draws the viewer's default view,
the active-memory timeline, as a static figure stacked by the Python line that allocated each block,
followed by the blocks alive at the peak and their stacks. The snapshot itself is written beside the
page (``.pickle``) for PyTorch's interactive viewer wherever the network is at hand.

Snapshots are pickles. They are read with an unpickler that refuses every class and function, so only
plain data (dicts, lists, strings, numbers) can come out of one: a crafted file cannot run code.
"""

from __future__ import annotations

import base64
import html
import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvlab.memory.units import MiB, fmt_bytes

_EMBEDDED = re.compile(r"const local_files = (\[.*?\])\s*\n", re.S)
_TOP_SITES = 8  # sites drawn in their own colour; the rest are stacked as "other"
_MAX_POINTS = 2000  # the figure samples at most this many events (always keeping the peak)


class SnapshotError(ValueError):
    """A file that is not a readable CUDA memory snapshot (the message names the file)."""


class _PlainData(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(f"holds a {module}.{name} object; a memory snapshot is plain data only")


def _pickled(path: Path) -> bytes:
    """The snapshot's pickle bytes: the file itself, or what a ``trace_plot`` page embeds."""
    raw = path.read_bytes()
    if path.suffix not in (".html", ".htm"):
        return raw
    match = _EMBEDDED.search(raw.decode("utf-8", errors="replace"))
    if match is None:
        raise SnapshotError(f"{path}: no embedded snapshot (expected a torch.cuda._memory_viz.trace_plot page)")
    return base64.b64decode(json.loads(match.group(1))[0]["base64"])


def read_snapshot(path: Path) -> dict:
    """The snapshot dict of a ``trace_plot`` HTML page or of a ``_dump_snapshot`` pickle."""
    raw = _pickled(path)
    try:
        data = _PlainData(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise SnapshotError(f"{path}: not a readable memory snapshot ({exc})") from None
    if not isinstance(data, dict) or "device_traces" not in data:
        raise SnapshotError(f"{path}: not a memory snapshot (no device_traces)")
    return data


BEFORE = "allocated before the trace"  # blocks alive when recording started: their stacks were not kept


def _site(frames: list[dict] | None, default: str = "(no Python frame)") -> str:
    """The innermost Python frame outside torch itself: the line of the user's code that allocated."""
    for frame in frames or []:
        name = str(frame.get("filename", ""))
        if name.endswith(".py") and not re.search(r"(^|/)torch/", name):
            return f"{'/'.join(Path(name).parts[-2:])}:{frame.get('line')} {frame.get('name')}"
    return default if frames else BEFORE


@dataclass
class Timeline:
    """Bytes alive after each trace event, by allocating site, for one device."""

    device: int
    sites: list[str]  # column order of ``alive``, largest at the peak first; the last may be "other"
    alive: np.ndarray  # (events + 1, sites): row 0 is the state before the first event
    times_s: np.ndarray  # (events + 1,) seconds since the first event (event index when untimed)
    peak_blocks: list[tuple[int, str, list[dict]]]  # (bytes, site, frames) of the blocks alive at the peak

    @property
    def total(self) -> np.ndarray:
        return self.alive.sum(axis=1)


def timeline(snapshot: dict) -> Timeline:
    """Replay the busiest device's trace; blocks alive before it started count from the first row."""
    traces = snapshot["device_traces"]
    device = max(range(len(traces)), key=lambda d: len(traces[d] or []))
    events = [e for e in traces[device] if e.get("action") in ("alloc", "free_completed", "free")]
    if not events:
        raise SnapshotError("the snapshot's trace has no allocations (was memory history recorded?)")
    alive: dict[int, tuple[int, str, list[dict]]] = {}
    for seg in snapshot.get("segments", []):  # blocks alive at the end: alive from the start unless allocated
        for block in seg.get("blocks", []) if seg.get("device", device) == device else []:
            if block.get("state") == "active_allocated":
                frames = block.get("frames") or []
                alive[block["address"]] = (block["size"], _site(frames), frames)
    for e in reversed(events):  # undo the trace to get the state before it
        if e["action"] == "alloc":
            alive.pop(e["addr"], None)
        else:
            alive[e["addr"]] = (e["size"], _site(e.get("frames")), e.get("frames") or [])
    columns: dict[str, int] = {}
    deltas: list[tuple[int, int]] = [(columns.setdefault(site, len(columns)), size) for size, site, _ in alive.values()]
    starts = len(deltas)
    site_of = {addr: site for addr, (_, site, _) in alive.items()}  # a free is charged to its block's site
    for e in events:
        if e["action"] == "alloc":
            site_of[e["addr"]] = _site(e.get("frames"))
            deltas.append((columns.setdefault(site_of[e["addr"]], len(columns)), e["size"]))
        else:
            site = site_of.pop(e["addr"], None) or _site(e.get("frames"))
            deltas.append((columns.setdefault(site, len(columns)), -e["size"]))
    steps = np.zeros((len(events) + 1, len(columns)))
    for row, (col, size) in enumerate(deltas):
        steps[max(row - starts + 1, 0), col] += size
    per_site = steps.cumsum(axis=0)
    peak = int(per_site.sum(axis=1).argmax())
    for e in events[:peak]:  # the blocks alive at the peak, with their stacks
        if e["action"] == "alloc":
            alive[e["addr"]] = (e["size"], _site(e.get("frames")), e.get("frames") or [])
        else:
            alive.pop(e["addr"], None)
    order = sorted(columns, key=lambda s: -per_site[peak, columns[s]])
    keep, rest = order[:_TOP_SITES], order[_TOP_SITES:]
    alive_by_site = np.stack([per_site[:, columns[s]] for s in keep], axis=1)
    if rest:
        other = per_site[:, [columns[s] for s in rest]].sum(axis=1, keepdims=True)
        alive_by_site, keep = np.concatenate([alive_by_site, other], axis=1), [*keep, "other"]
    stamps = [e.get("time_us") for e in events]
    if all(isinstance(t, (int, float)) for t in stamps):
        times = np.array([stamps[0], *stamps], dtype=float)
        times = (times - times[0]) / 1e6
    else:
        times = np.arange(len(events) + 1, dtype=float)
    blocks = sorted(alive.values(), key=lambda b: -b[0])
    return Timeline(device, keep, alive_by_site, times, blocks)


def _figure_png(tl: Timeline, title: str) -> bytes:
    """The stacked timeline; when memory allocated before the trace dominates (the weights, say), the
    y axis starts just below it so that what the traced code did stays visible."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = np.unique(np.concatenate([np.linspace(0, len(tl.times_s) - 1, _MAX_POINTS).astype(int),
                                     [int(tl.total.argmax())]]))
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.stackplot(tl.times_s[rows], (tl.alive[rows] / MiB).T, labels=tl.sites, step="post")
    ax.set_title(title)
    untimed = np.array_equal(tl.times_s, np.arange(len(tl.times_s)))
    ax.set_xlabel("trace event" if untimed else "time since the first traced event (s)")
    ax.set_ylabel("allocated (MiB)")
    floor = tl.alive[:, tl.sites.index(BEFORE)].min() / MiB if BEFORE in tl.sites else 0.0
    peak = tl.total.max() / MiB
    if floor > 0.5 * peak:
        ax.set_ylim(floor - 0.1 * (peak - floor), peak + 0.05 * (peak - floor))
        ax.set_ylabel(f"allocated (MiB; the axis starts at {floor - 0.1 * (peak - floor):.0f})")
    ax.legend(loc="upper left", fontsize=8, title="allocated at")
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def _stack_text(frames: list[dict]) -> str:
    py = [f for f in frames if str(f.get("filename", "")).endswith(".py")] or frames
    return "\n".join(f"{f.get('filename')}:{f.get('line')} {f.get('name')}" for f in py[:12])


def _page(name: str, tl: Timeline, png: bytes, pickle_name: str, back: str | None) -> str:
    esc = html.escape
    peak_row = int(tl.total.argmax())
    sites = "".join(f"<tr><td><code>{esc(s)}</code></td><td>{esc(fmt_bytes(tl.alive[peak_row, i]))}</td></tr>"
                    for i, s in enumerate(tl.sites))
    groups: dict[tuple[str, int], list[list[dict]]] = {}  # same line, same size: one row with a count
    for size, site, frames in tl.peak_blocks:
        if site != BEFORE:  # blocks from before the trace have no stack to show
            groups.setdefault((site, size), []).append(frames)
    largest = sorted(groups.items(), key=lambda kv: -kv[0][1] * len(kv[1]))[:10]
    blocks = "".join(f"<details><summary>{len(stacks)} × {esc(fmt_bytes(size))} — <code>{esc(site)}</code></summary>"
                     f"<pre>{esc(_stack_text(stacks[0]))}</pre></details>" for (site, size), stacks in largest)
    nav = f'<p><a href="{esc(back)}">← back to the reports</a></p>' if back else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CUDA memory snapshot — {esc(name)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:72rem;margin:1.5rem auto;padding:0 1rem;line-height:1.5}}
img{{max-width:100%}}table{{border-collapse:collapse}}td,th{{padding:.2rem .8rem;border-bottom:1px solid #ddd;
text-align:left}}pre{{background:#f6f6f6;padding:.5rem;overflow-x:auto}}</style></head><body>
{nav}<h1>CUDA memory snapshot — {esc(name)}</h1>
<p>PyTorch's allocator history for device {tl.device}: {len(tl.times_s) - 1} allocations and frees, peak
<b>{esc(fmt_bytes(tl.total.max()))}</b> allocated, {esc(fmt_bytes(tl.total[-1]))} still allocated at the end
({esc(fmt_bytes(tl.total[0]))} before the trace started). The figure is the active-memory timeline of PyTorch's
memory viewer, drawn from the same snapshot, stacked by the Python line that allocated each block.</p>
<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="active memory timeline of {esc(name)}">
<h2>At the peak, by allocating line</h2><table><tr><th>allocated at</th><th>alive</th></tr>{sites}</table>
<h2>The largest blocks the trace allocated, alive at the peak (stack of the first)</h2>{blocks}
<h2>Interactive view</h2><p>The snapshot is <a href="{esc(pickle_name)}">{esc(pickle_name)}</a>: drop it on
PyTorch's viewer at <a href="https://pytorch.org/memory_viz">pytorch.org/memory_viz</a> (which needs the
network) to browse every block and its stack.</p></body></html>
"""


def offline_snapshot(source: Path, target: Path, back: str | None = None) -> Path:
    """Write ``target`` (HTML, self-contained) and the snapshot beside it as ``target.stem + '.pickle'``.

    ``source`` is a ``trace_plot`` page or a ``_dump_snapshot`` pickle; ``back`` an optional link to the
    page that leads here. Raises :class:`SnapshotError` for a file that is not a snapshot.
    """
    source, target = Path(source), Path(target)
    tl = timeline(read_snapshot(source))
    target.parent.mkdir(parents=True, exist_ok=True)
    pickle_path = target.with_suffix(".pickle")
    if not (pickle_path.exists() and pickle_path.samefile(source)):
        pickle_path.write_bytes(_pickled(source))  # the recorded bytes, as PyTorch wrote them
    png = _figure_png(tl, f"Active memory timeline — {target.stem}")
    target.write_text(_page(target.stem, tl, png, pickle_path.name, back), encoding="utf-8")
    return target
