"""The ``kvlab`` command: build and validate checkpoints, reproduce the leak, render reports, run the demo.

Exit codes are meant for scripts and CI: **0** the command did what was asked and every check passed,
**1** a check failed (validation found an error, a leak was found with ``--fail-on-leak``, the demo
did not show the expected contrast), **2** bad input or usage (unknown option, a value out of range, a
checkpoint that cannot be read, a folder that cannot be written, a device that is not there). Messages
for 1 and 2 go to stderr, one line naming the file or option at fault, never a traceback.

This module only parses and checks arguments; the work is done by the core (checkpoints) and the
study (:func:`kvlab.study.reproduce.reproduce`). ``report``, ``demo`` and ``diagnose`` parse their own
options (``kvlab report --help``) and share this module's error handling.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: Commands that parse their own options, and the module whose ``main(argv)`` runs them.
DELEGATED = {"report": "kvlab.report", "demo": "kvlab.demo", "diagnose": "kvlab.diagnose"}


class UsageError(Exception):
    """Bad input that the user can fix: reported in one line, exit code 2."""


# ---------------------------------------------------------------------------------------- argument checks
def _at_least(option: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{option} must be at least {minimum}, got {value}")


def _device(name: str) -> Any:
    """The torch device ``--device`` names, refused unless this machine has it."""
    from .study.env import parse_device

    try:
        return parse_device(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _preset(name: str) -> None:
    from .config import PRESETS

    if name not in PRESETS:
        raise UsageError(f"--preset {name!r}: choose from {sorted(PRESETS)}")


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        _at_least("--threads", threads, 1)
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------- commands
def cmd_build_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint_write import save_checkpoint
    from .config import preset
    from .synthetic import build_checkpoint, random_state_dict

    _preset(args.preset)
    _at_least("--seed", args.seed, 0)
    _at_least("--shard-bytes", args.shard_bytes, 1)
    if args.out is not None and args.out.is_dir() and not args.overwrite:
        raise UsageError(f"{args.out}: already exists; pass --overwrite to replace it")
    if args.out is None:
        path = build_checkpoint(args.preset, seed=args.seed, max_shard_bytes=args.shard_bytes, overwrite=args.overwrite)
    else:
        config = preset(args.preset)
        path = save_checkpoint(random_state_dict(config, args.seed), config, args.out, args.shard_bytes,
                               overwrite=args.overwrite)
    print(path)
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from kvlab.memory.units import fmt_bytes
    from kvlab.memory.validate import as_dtype, validate_model

    from .checkpoint import validate_checkpoint

    _at_least("--limit", args.limit, 0)
    try:
        expected_dtype = as_dtype(args.expected_dtype)
    except ValueError as exc:
        raise UsageError(f"--expected-dtype: {exc}") from None
    device = _device(args.device) if args.loader is not None else None  # before anything prints "OK"
    report = validate_checkpoint(args.path, expected_dtype=expected_dtype)
    reports = [report]
    print(report.verdict)
    details = ", ".join(f"{k}={fmt_bytes(v) if k == 'bytes' else v}" for k, v in report.details.items())
    print(f"  checkpoint: {details}")
    if report.findings:
        print(report.describe(limit=args.limit))
    if args.loader is not None:
        from .loaders import load_model

        model = load_model(args.path, args.loader, device=device)
        model_report = validate_model(model, expected_dtype=expected_dtype, expected_device=device)
        model_report.subject = f"{args.path} loaded with loader={args.loader!r}"
        reports.append(model_report)
        print(model_report.verdict)
        if not model_report.findings.empty:
            print(model_report.describe(limit=args.limit))
    failed = [r for r in reports if not (r.clean if args.strict else r.passed)]
    if failed:
        print(f"kvlab validate: check failed: {failed[0].verdict}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_reproduce(args: argparse.Namespace) -> int:
    from kvlab.caches import CACHES
    from kvlab.memory.units import fmt_bytes
    from kvlab.study.reproduce import reproduce

    _preset(args.preset)
    if args.cache not in CACHES:
        raise UsageError(f"--cache {args.cache!r}: choose from {list(CACHES)}")
    _at_least("--tokens", args.tokens, 2)  # memory is compared at tokens/2 and tokens
    _at_least("--prompt-len", args.prompt_len, 1)
    _at_least("--seed", args.seed, 0)
    _device(args.device)
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint}: not a checkpoint directory")
    result = reproduce(args.preset, args.loader, args.cache, args.tokens, args.out, seed=args.seed,
                       prompt_len=args.prompt_len, device=args.device, checkpoint=args.checkpoint,
                       progress=not args.quiet)
    check = result.meta["leak_check"]
    print(f"{result.meta['verdict']}: retained {fmt_bytes(check['retained_n_bytes'])} after {check['steps']} "
          f"steps, {fmt_bytes(check['retained_2n_bytes'])} after {2 * check['steps']} (x{check['growth_ratio']:.2f}); "
          f"KV cache {fmt_bytes(check['kv_cache_2n_bytes'])}")
    for path in (result.csv, result.png, result.json):
        print(f"  wrote {path}")
    if result.leak and args.fail_on_leak:
        print(f"kvlab reproduce: leak found:\n{result.meta['explanation']}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .loaders import LOADERS

    parser = argparse.ArgumentParser(
        prog="kvlab", description="Reproduce, trace, explain and fix the autograd 'KV-cache memory leak'.",
        epilog="exit codes: 0 ok, 1 a check failed or a leak was found, 2 bad input or usage")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("build-checkpoint", help="write a deterministic random-weight checkpoint",
                       description="Write a seeded random-weight checkpoint in the Hugging Face layout "
                                   "(config.json + safetensors). Prints its directory.")
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, mistral-7b; default tiny)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--out", type=Path, help="checkpoint directory (default: data/checkpoints/<preset>-seed<seed>)")
    p.add_argument("--shard-bytes", type=int, help="cut safetensors shards above this many bytes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.set_defaults(func=cmd_build_checkpoint)

    p = sub.add_parser("validate", help="validate a checkpoint (and, with --loader, the loaded model)",
                       description="Check a checkpoint for everything loading checks, from its headers and "
                                   "tensors; with --loader also load it and check the model for what breaks "
                                   "inference memory (weights requiring grad, copied ties, meta, mixed dtypes "
                                   "...). Exit 1 when a check fails, 2 when the checkpoint cannot be used.")
    p.add_argument("path", type=Path, help="checkpoint directory")
    p.add_argument("--loader", choices=LOADERS, help="also load with this loader and validate the model")
    p.add_argument("--device", default="cpu", help="device to load on (default cpu)")
    p.add_argument("--expected-dtype", help="fail unless weights are this dtype (e.g. bfloat16)")
    p.add_argument("--strict", action="store_true", help="warnings fail too")
    p.add_argument("--limit", type=int, default=20, help="findings to print (default 20)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("reproduce", help="decode with one loader and cache; write CSV, PNG and JSON",
                       description="Generate tokens with one loader and cache, recording exact live tensor "
                                   "bytes, KV-cache bytes, RSS and time per step; write <out>/reproduce-*.csv, "
                                   ".png and .json (with the command to rerun it).")
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--loader", default="trainable", choices=LOADERS, help="loader (default trainable: the leak)")
    p.add_argument("--cache", default="concat", help="cache design (default concat)")
    p.add_argument("--tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--out", type=Path, default=Path("results"), help="output folder (default results/)")
    p.add_argument("--seed", type=int, default=0, help="weight and prompt seed (default 0)")
    p.add_argument("--prompt-len", type=int, default=1, help="prompt tokens (default 1)")
    p.add_argument("--device", default="cpu", help="device (default cpu)")
    p.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of building the preset's")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--fail-on-leak", action="store_true", help="exit 1 when the run leaks")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_reproduce)

    for name, help_text in (("report", "execute the notebooks and render the reports (kvlab report --help)"),
                            ("demo", "the leak vs the fix in a few seconds (kvlab demo --help)"),
                            ("diagnose", "diagnose your own decode loop (kvlab diagnose --help)")):
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _error_line(command: str, exc: BaseException) -> str:
    """One line for a failure the user can fix, naming the file or option at fault."""
    from .errors import CheckpointError

    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        message = f"error: {where}{exc.strerror or exc}"
    elif isinstance(exc, CheckpointError) and command != "build-checkpoint":
        message = f"invalid checkpoint: {exc}"
    else:
        message = f"error: {exc}"
    return f"kvlab {command}: {' '.join(message.split())}"


def _run(command: str, work: Callable[[], int]) -> int:
    """Run a command; bad input (usage errors, unusable checkpoints, unwritable paths) -> one line, exit 2."""
    from .errors import CheckpointError

    try:
        return work()
    except (UsageError, CheckpointError, OSError) as exc:
        print(_error_line(command, exc), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"kvlab {command}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvlab`` console script and ``python -m kvlab``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:  # delegated whole, so that its own --help and options apply
        command, rest = argv[0], argv[1:]
        return _run(command, lambda: importlib.import_module(DELEGATED[command]).main(rest))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE

    def work() -> int:
        _set_threads(getattr(args, "threads", None))
        return args.func(args)

    return _run(args.command, work)


if __name__ == "__main__":
    raise SystemExit(main())
