"""What ``kvlab diagnose`` runs: a user's decode loop, found from a ``file.py:function`` or
``package.module:function`` string, with the modules it uses.

The loop follows the leak guard's contract, ``run(steps) -> kept``: it decodes ``steps`` tokens and
returns what it keeps (the cache, logits, state). If ``run`` also takes a ``device`` keyword, the
diagnosis passes ``--device`` to it. Every mistake a user can make here (a file that is not there, an
import that fails, a name that is not callable) becomes a :class:`BadTarget` with a one-line message:
the command turns it into exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["BadTarget", "Target", "load_target", "target_from_callable", "modules_near"]


class BadTarget(ValueError):
    """The thing to diagnose cannot be run as asked; the message is one line naming what is wrong."""


@dataclass
class Target:
    """A decode loop ready to diagnose."""

    run: Callable[..., Any]  # run(steps) -> kept
    name: str  # as the user wrote it, for titles and file names
    modules: dict[str, nn.Module] = field(default_factory=dict)  # the models the loop uses, by variable name
    config: Any = None  # a config with KV-cache fields (a transformers config), when one is known
    kind: str = "function"  # "function" or "hf"
    takes_device: bool = False

    def __call__(self, steps: int, device: str) -> Any:
        return self.run(steps, device=device) if self.takes_device else self.run(steps)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _import_file(path: Path) -> Any:
    """Import a Python file as a module of its own, with its folder importable (as ``python file.py`` would)."""
    if not path.is_file():
        raise BadTarget(f"{path}: no such file")
    name = "kvlab_diagnose_" + re.sub(r"\W", "_", str(path.resolve().with_suffix("")))
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # so the file can import its neighbours
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BadTarget(f"{path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code, any error: reported in one line
        sys.modules.pop(name, None)
        raise BadTarget(f"cannot import {path}: {_one_line(exc)}") from None
    return module


def _import_module(dotted: str) -> Any:
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # `pkg.mod:run` from the current folder, as `python -m` finds it
    try:
        return importlib.import_module(dotted)
    except Exception as exc:
        raise BadTarget(f"cannot import module {dotted!r}: {_one_line(exc)}") from None


def modules_near(run: Callable[..., Any], namespace: dict[str, Any] | None = None) -> dict[str, nn.Module]:
    """The ``nn.Module``\\ s a loop uses, by name: bound ``self``, ``functools.partial`` arguments, closure
    variables, the globals it names, and the module-level models of the file it comes from (``namespace``).

    Submodules of a module already found are dropped: validating the model validates its layers.
    """
    found: dict[str, nn.Module] = {}
    func = run
    if isinstance(func, functools.partial):
        found.update({f"arg{i}": a for i, a in enumerate(func.args) if isinstance(a, nn.Module)})
        found.update({k: v for k, v in func.keywords.items() if isinstance(v, nn.Module)})
        func = func.func
    owner = getattr(func, "__self__", None)
    if isinstance(owner, nn.Module):
        found["self"] = owner
    try:
        closure = inspect.getclosurevars(func)
        found.update({k: v for k, v in {**closure.globals, **closure.nonlocals}.items() if isinstance(v, nn.Module)})
    except (TypeError, ValueError):
        pass  # a builtin or a callable object: nothing to inspect
    if namespace:
        found.update({k: v for k, v in namespace.items() if isinstance(v, nn.Module) and not k.startswith("_")})
    unique: dict[int, tuple[str, nn.Module]] = {}
    for name, module in found.items():
        unique.setdefault(id(module), (name, module))
    inner = {id(sub) for _, m in unique.values() for sub in m.modules() if sub is not m}
    return {name: m for key, (name, m) in unique.items() if key not in inner}


def _takes_device(run: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(run).parameters
    except (TypeError, ValueError):
        return False
    return "device" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def target_from_callable(run: Callable[..., Any], name: str | None = None,
                         namespace: dict[str, Any] | None = None) -> Target:
    """A :class:`Target` for a callable already in hand (the Python API's entry point)."""
    if not callable(run):
        raise BadTarget(f"{name or run!r} is not callable ({type(run).__name__}): it must be a function run(steps)")
    modules = modules_near(run, namespace)
    config = next((m.config for m in modules.values() if getattr(m, "config", None) is not None), None)
    return Target(run=run, name=name or getattr(run, "__qualname__", repr(run)), modules=modules, config=config,
                  takes_device=_takes_device(run))


def load_target(spec: str) -> Target:
    """Resolve ``path/to/file.py:function`` or ``package.module:function`` (``function`` may be dotted)."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise BadTarget(f"{spec!r}: expected path/to/file.py:function or package.module:function")
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    module = _import_file(Path(where)) if is_file else _import_module(where)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadTarget(f"{where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj) or isinstance(obj, type):
        kind = "a class" if isinstance(obj, type) else type(obj).__name__
        raise BadTarget(f"{spec}: {attr} is {kind}, not a function run(steps) returning what the loop keeps")
    return target_from_callable(obj, spec, vars(module))
