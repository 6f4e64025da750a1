"""Reading a checkpoint's files without trusting them: regular files only, strict JSON, safetensors headers.

Everything a checkpoint directory holds was written by someone else, so every read here checks before
it trusts:

- :func:`open_regular` opens regular files only. A FIFO named ``model.safetensors`` would block the
  first ``read`` forever and a device file may never end, so anything else (FIFO, directory, device,
  socket) is refused before it is opened, and checked again on the open descriptor.
- :func:`read_json` reads a size-limited, strict JSON document (UTF-8 without lone surrogates, no
  duplicate keys, no NaN/Infinity): ``config.json`` and the shard index.
- :func:`read_header` checks one safetensors header as strictly as safetensors itself does, reading
  the header only: dtypes, shapes, and byte ranges that tile the data region exactly.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from .errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces

DTYPES: dict[str, torch.dtype] = {  # safetensors dtype strings
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives and what it is, as read from a header (no data read)."""

    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def open_regular(path: Path, what: str, error: type[CheckpointError] = CheckpointError) -> IO[bytes]:
    """Open ``path`` for reading if it is a regular file (symlinks followed); else raise ``error``.

    The type is checked with ``stat`` before opening and again with ``fstat`` on the descriptor,
    which is opened non-blocking so that a file swapped for a FIFO in between cannot hang the open.
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path}: is {_kind(mode)}, not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except CheckpointError:
        raise  # a ValueError too: already says what is wrong with the path
    except (OSError, ValueError) as exc:  # ValueError: a NUL in a name taken from an index
        raise error(f"{path}: cannot read {what} ({exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path}: is {_kind(mode)}, not a regular file")
    return os.fdopen(fd, "rb")


def read_json(path: Path, what: str, error: type[CheckpointError] = CheckpointError) -> Any:
    """A strict JSON document from a regular file of at most :data:`MAX_HEADER_BYTES`."""
    with open_regular(path, what, error) as f:
        try:
            if os.fstat(f.fileno()).st_size > MAX_HEADER_BYTES:
                raise error(f"{path}: {what} is larger than {MAX_HEADER_BYTES} bytes")
            raw = f.read()
        except OSError as exc:
            raise error(f"{path}: cannot read {what} ({exc})") from None
    return parse_json(path, raw, what, error)


def parse_json(path: Path, raw: bytes, what: str, error: type[CheckpointError] = CheckpointError) -> Any:
    """Strict JSON: UTF-8 without lone surrogates, no duplicate keys, no NaN/Infinity."""
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    def no_constant(token: str) -> Any:
        raise ValueError(f"{token} is not allowed")

    try:
        value = json.loads(raw.decode(), object_pairs_hook=no_duplicates, parse_constant=no_constant)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # fails on an escaped lone surrogate
        return value
    except (ValueError, RecursionError) as exc:  # UnicodeError and JSONDecodeError are ValueErrors
        raise error(f"{path}: {what} is not valid UTF-8 JSON ({exc})") from None


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Check one safetensors header as strictly as safetensors does, reading only the header."""
    with open_regular(path, "safetensors file") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(9)
            length = int.from_bytes(head[:8], "little")
            fits = length <= min(size - 8, MAX_HEADER_BYTES)
            looks_safe = len(head) == 9 and fits and head[8] in b"{ \t\r\n"
            is_zip = head.startswith(b"PK\x03\x04")
            is_pickle = len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO opcode
            if (is_zip or is_pickle) and not looks_safe:
                raise CheckpointError(f"{path}: is a pickle or zip (torch.save) file, not safetensors; "
                                      "kvlab never unpickles weights (that can run arbitrary code): "
                                      "convert it to safetensors")
            if size < 8 or not fits:
                raise CheckpointError(f"{path}: header length {length} does not fit the file ({size} bytes) "
                                      f"and the {MAX_HEADER_BYTES}-byte limit")
            f.seek(8)
            raw = f.read(length)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc})") from None
    header = parse_json(path, raw, "header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: field '__metadata__' must map strings to strings")
    data_len = size - 8 - length
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, desc in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(desc, dict) or set(desc) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: entry must have exactly 'dtype', 'shape' and 'data_offsets'")
        dtype = DTYPES.get(desc["dtype"]) if isinstance(desc["dtype"], str) else None
        shape, offsets = desc["shape"], desc["data_offsets"]
        if dtype is None:
            raise CheckpointError(f"{where}: unknown dtype {desc['dtype']!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: field 'shape' must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} are not within the "
                                  f"{data_len}-byte data region")
        if numel(shape, data_len) * dtype.itemsize != offsets[1] - offsets[0]:
            raise CheckpointError(f"{where}: shape {shape} of {desc['dtype']} does not fill "
                                  f"data_offsets {offsets} ({offsets[1] - offsets[0]} bytes)")
        entries[name] = TensorEntry(path, dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], name))
    end, previous = 0, None
    for begin, stop, name in sorted(spans):  # safetensors requires tensors to tile the data exactly
        if begin != end:
            problem = f"overlaps tensor {previous!r}" if begin < end else f"leaves a {begin - end}-byte gap"
            raise CheckpointError(f"{path}: tensor {name!r} {problem} (data_offsets start at {begin})")
        end, previous = stop, name
    if end != data_len:
        raise CheckpointError(f"{path}: {data_len - end} bytes after the last tensor are not covered "
                              "by the header")
    return entries


def numel(shape: list[int] | tuple[int, ...], limit: int | None = None) -> int:
    """Element count; with ``limit``, stops once past it, so a hostile shape never builds a huge number."""
    count = 0 if 0 in shape else 1
    for dim in shape:
        if limit is not None and count > limit:
            break
        count *= dim
    return count


def few_names(names: list[str], limit: int = 5) -> str:
    """``names`` for an error message: all of them, or the first ``limit`` and how many more."""
    return repr(names) if len(names) <= limit else f"{names[:limit]!r} and {len(names) - limit} more"
