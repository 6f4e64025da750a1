"""Attribution: what an allocation is charged to, decided the same way for any PyTorch model.

Three sources, tried in order, each cheaper than the next is informative:

1. **Region**: the innermost open ``torch.profiler.record_function`` region. Its enter and exit reach
   a dispatch mode as the ops ``profiler::_record_function_enter_new`` and
   ``profiler::_record_function_exit`` (under grad, ``no_grad`` and ``inference_mode`` alike), so
   :class:`~kvlab.memory.dispatch.DispatchHook` keeps an :class:`Attribution`'s region stack from them.
   Any model annotated the standard way is attributed by its own names, with no import of kvlab.
2. **Module path**: the innermost ``nn.Module`` whose ``forward`` is running, named as in
   ``named_modules()`` of its root (``model.layers.3.self_attn``; a root itself by its class name).
   It is found by walking the Python frames of the allocating call, so it costs nothing per module
   call (global forward hooks would send every module call down ``nn.Module``'s slow path) and is
   paid only by allocations made outside any region.
3. **Python line**: the innermost frame outside PyTorch, the standard library and this package
   (``"tests/test_x.py:12 step"``), as a heap profiler would report it.

Frames of files inside ``kvlab/memory`` are never "the caller": tools built on these helpers need not
register themselves anywhere.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["UNLABELLED", "Attribution", "ModuleNames", "caller_site", "find_root_modules"]

UNLABELLED = "<unlabelled>"

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_STDLIB_DIR = os.path.dirname(contextlib.__file__) + os.sep
_TOOLS_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_file_labels: dict[Any, str | None] = {}  # code object -> None (not a caller) or "dir/file.py"


def _file_label(code: Any) -> str | None:
    """``"dir/file.py"`` for a frame that can be the caller of an allocation, else ``None`` (cached)."""
    label = _file_labels.get(code, "")
    if label != "":
        return label
    filename = code.co_filename
    stdlib = filename.startswith(_STDLIB_DIR) and "-packages" not in filename[len(_STDLIB_DIR):]
    if (stdlib or filename.startswith(_TORCH_DIR) or filename.startswith(_TOOLS_DIR)
            or filename.startswith("<frozen")):
        label = None
    else:
        label = "/".join(filename.replace("\\", "/").split("/")[-2:])
    _file_labels[code] = label
    return label


def caller_site(depth: int = 1) -> str:
    """The innermost Python frame outside PyTorch, the standard library and ``kvlab.memory``, as
    ``"dir/file.py:line function"``; ``depth`` frames are skipped first (1: this function's caller)."""
    frame: Any = sys._getframe(depth)
    while frame is not None:
        prefix = _file_label(frame.f_code)
        if prefix is not None:
            return f"{prefix}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return UNLABELLED


class ModuleNames:
    """Names of the modules under some roots, and the ``forward`` code objects that reveal them on a stack.

    Modules are keyed by ``id`` with a weak reference beside the name, so that naming them keeps no
    model alive (a model deleted while tracing must free its weights) and a reused ``id`` is not
    mistaken for the dead module. Modules created after the names were taken are not named; their
    allocations go to the enclosing named module, or to the Python line.
    """

    def __init__(self, roots: Iterable[nn.Module]) -> None:
        self._names: dict[int, tuple[weakref.ref, str]] = {}
        self.forwards: set[Any] = set()
        for root in roots:
            for path, module in root.named_modules(remove_duplicate=True):
                if id(module) in self._names:
                    continue
                self._names[id(module)] = (weakref.ref(module), path or type(module).__name__)
                # The code that runs with ``self`` bound: under any decorators (transformers wraps many).
                code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
                if code is not None:
                    self.forwards.add(code)

    def __len__(self) -> int:
        return len(self._names)

    def name(self, module: object) -> str | None:
        entry = self._names.get(id(module))
        return entry[1] if entry is not None and entry[0]() is module else None


def find_root_modules(candidates: Iterable[Any]) -> list[nn.Module]:
    """The modules among ``candidates`` that are not a submodule of another candidate."""
    modules = [m for m in candidates if isinstance(m, nn.Module)]
    children = {id(child) for m in modules for child in m.children()}
    return [m for m in modules if id(m) not in children]


class Attribution:
    """The attribution state of one thread: its open regions, plus the module names to look for.

    :class:`~kvlab.memory.dispatch.DispatchHook` calls :meth:`enter` and :meth:`exit` with a key of the
    handle that ``record_function`` passes to its exit op, so a region closed out of order (a
    ``record_function`` entered by hand) is still removed correctly. ``listeners`` are called with
    ``(name, entering)`` before each change, for tools that log region boundaries.
    """

    __slots__ = ("regions", "_handles", "modules", "frames", "listeners")

    def __init__(self, modules: ModuleNames | None = None, frames: bool = True) -> None:
        self.regions: list[str] = []  # open record_function names, outermost first
        self._handles: list[int] = []
        self.modules = modules if modules is not None and len(modules) else None
        self.frames = frames
        self.listeners: list[Callable[[str, bool], None]] = []

    def enter(self, handle: int, name: str) -> None:
        for listener in self.listeners:
            listener(name, True)
        self._handles.append(handle)
        self.regions.append(name)

    def exit(self, handle: int) -> None:
        handles = self._handles
        if handles and handles[-1] == handle:
            i = len(handles) - 1
        else:
            i = next((j for j in range(len(handles) - 1, -1, -1) if handles[j] == handle), -1)
            if i < 0:
                return  # entered before this attribution started: not ours to close
        for listener in self.listeners:
            listener(self.regions[i], False)
        del handles[i], self.regions[i]

    def label(self) -> str:
        """What an allocation made now, in this thread, is charged to (see the module docstring)."""
        if self.regions:
            return self.regions[-1]
        if not self.frames:
            return UNLABELLED
        return self.frame_label(sys._getframe(1))

    def frame_label(self, frame: Any) -> str:
        """Module path of the innermost named module running above ``frame``, else its Python line."""
        modules = self.modules
        line = None
        while frame is not None:
            code = frame.f_code
            if modules is not None and code in modules.forwards:
                name = modules.name(frame.f_locals.get("self"))
                if name is not None:
                    return name
            if line is None:
                prefix = _file_label(code)
                if prefix is not None:
                    line = f"{prefix}:{frame.f_lineno} {code.co_name}"
                    if modules is None:
                        return line
            frame = frame.f_back
        return line if line is not None else UNLABELLED
