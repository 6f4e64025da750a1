"""The ``kvlab`` command: build and validate checkpoints, reproduce the leak, render reports, run the demo.

Exit codes are meant for scripts and CI: **0** the command did what was asked and every check passed,
**1** a check failed (validation found an error, a leak was found with ``--fail-on-leak``, the demo
did not show the expected contrast), **2** bad input or usage (unknown option, a checkpoint that
cannot be read, a device that is not there). Messages for 1 and 2 go to stderr and name the file or
option at fault.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input that the user can fix: reported in one line, exit code 2."""


# ---------------------------------------------------------------------------------------- helpers
def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        if threads < 1:
            raise UsageError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def _device(name: str) -> Any:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available in this build of PyTorch / on this machine")
    return device


def _preset_config(name: str) -> Any:
    from .config import PRESETS, preset

    if name not in PRESETS:
        raise UsageError(f"--preset {name!r}: choose from {sorted(PRESETS)}")
    return preset(name)


# ---------------------------------------------------------------------------------------- build-checkpoint
def cmd_build_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint import build_checkpoint, random_state_dict, save_checkpoint

    config = _preset_config(args.preset)
    if args.shard_bytes is not None and args.shard_bytes <= 0:
        raise UsageError(f"--shard-bytes must be positive, got {args.shard_bytes}")
    if args.out is None:
        path = build_checkpoint(args.preset, seed=args.seed, max_shard_bytes=args.shard_bytes, overwrite=args.overwrite)
    else:
        path = save_checkpoint(random_state_dict(config, args.seed), config, args.out, args.shard_bytes,
                               overwrite=args.overwrite)
    print(path)
    return EXIT_OK


# ---------------------------------------------------------------------------------------- validate
def cmd_validate(args: argparse.Namespace) -> int:
    from kvlab.memory.trace import fmt_bytes
    from kvlab.memory.validate import as_dtype, validate_checkpoint, validate_model

    try:
        expected_dtype = as_dtype(args.expected_dtype)
    except ValueError as exc:
        raise UsageError(f"--expected-dtype: {exc}") from None
    path = Path(args.path)
    report = validate_checkpoint(path, expected_dtype=expected_dtype)
    reports = [report]
    print(report.verdict)
    details = ", ".join(f"{k}={fmt_bytes(v) if k == 'bytes' else v}" for k, v in report.details.items())
    print(f"  checkpoint: {details}")
    if not report.findings.empty:
        print(report.describe(limit=args.limit))
    if args.loader is not None:
        from .loaders import load_model

        model = load_model(path, args.loader, device=_device(args.device))
        model_report = validate_model(model, expected_dtype=expected_dtype, expected_device=args.device)
        model_report.subject = f"{path} loaded with loader={args.loader!r}"
        reports.append(model_report)
        print(model_report.verdict)
        if not model_report.findings.empty:
            print(model_report.describe(limit=args.limit))
    failed = [r for r in reports if not (r.clean if args.strict else r.passed)]
    if failed:
        print(f"kvlab validate: check failed: {failed[0].verdict}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# ---------------------------------------------------------------------------------------- reproduce
@dataclass
class Reproduction:
    """What ``kvlab reproduce`` wrote and found."""

    csv: Path
    png: Path
    json: Path
    tokens: list[int]
    leak: bool
    meta: dict[str, Any]


def reproduce(preset_name: str = "tiny", loader: str = "trainable", cache: str = "concat", tokens: int = 256,
              out: str | Path = "results", *, seed: int = 0, prompt_len: int = 1, device: str = "cpu",
              checkpoint: str | Path | None = None, progress: bool = True) -> Reproduction:
    """Decode ``tokens`` tokens with one loader and cache; write per-step memory (CSV), a plot (PNG), metadata (JSON).

    Per step: exact live tensor bytes and the peak inside the step (:class:`kvlab.memory.trace.MemoryTracer`,
    weights excluded), the cache's bytes next to the analytic KV size, process RSS and the step time.
    The verdict compares what the loop keeps after ``tokens // 2`` and ``tokens`` steps with the KV
    cache's analytic growth (:func:`kvlab.memory.leakguard.compare_retained`). Everything needed to rerun is
    in the JSON, including the exact command and a hash of the generated tokens.
    """
    import pandas as pd
    import psutil
    import torch

    from .caches import kv_bytes, make_cache
    from .checkpoint import build_checkpoint
    from .generate import Step, generate
    from kvlab.memory.leakguard import compare_retained, measure_retained
    from .loaders import LOADERS, load_model
    from kvlab.memory.trace import MemoryTracer, chain_callbacks

    if loader not in LOADERS:
        raise UsageError(f"--loader {loader!r}: choose from {list(LOADERS)}")
    if tokens < 2:
        raise UsageError(f"--tokens must be at least 2 (memory is compared at tokens/2 and tokens), got {tokens}")
    if prompt_len < 1:
        raise UsageError(f"--prompt-len must be at least 1, got {prompt_len}")
    _preset_config(preset_name)  # a usage error before any work
    dev = _device(device)
    directory = Path(checkpoint) if checkpoint is not None else build_checkpoint(preset_name, seed=seed)
    model = load_model(directory, loader, device=dev)
    config = model.config
    try:
        kv_cache = make_cache(cache, config, batch_size=1, max_tokens=prompt_len + tokens, device=dev)
    except ValueError as exc:
        raise UsageError(f"--cache {cache!r}: {exc}") from None
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=generator).to(dev)

    half = tokens // 2
    process = psutil.Process()
    rows: list[dict[str, Any]] = []
    retained: dict[int, Any] = {}
    last = time.perf_counter()

    def probe(step: Step) -> None:
        nonlocal last
        now = time.perf_counter()
        seq = step.cache.seq_len if step.cache is not None else prompt_len + step.index
        row: dict[str, Any] = {"step": step.index, "positions": seq, "step_s": now - last,
                               "cache_bytes": step.cache.nbytes if step.cache is not None else 0,
                               "rss_bytes": process.memory_info().rss}
        with contextlib.suppress(ValueError):  # a design the closed form does not cover
            row["kv_analytic_bytes"] = kv_bytes(config, 1, seq, kind=cache, max_tokens=prompt_len + tokens)
        if dev.type == "cuda":
            row["cuda_allocated_bytes"] = torch.cuda.memory_allocated(dev)
        if step.index + 1 in (half, tokens):
            retained[step.index + 1] = measure_retained((step.cache, step.logits), model)
        rows.append(row)
        last = time.perf_counter()

    start = time.perf_counter()
    with MemoryTracer(device=dev.type) as tracer:
        result = generate(model, prompt, tokens, cache=kv_cache, progress=progress,
                          on_step=chain_callbacks(tracer.mark_step, probe))
    seconds = time.perf_counter() - start
    frame = pd.DataFrame(rows).merge(tracer.timeline()[["step", "live_bytes", "peak_bytes"]], on="step", how="left")
    # Growth since the first step: the first step also pays one-off costs (thread pools, allocator arenas).
    frame["rss_growth_bytes"] = frame["rss_bytes"] - frame["rss_bytes"].iloc[0]
    report = compare_retained(retained[half], retained[tokens], tokens - half, config=config)
    generated = result.tokens[0, prompt_len:].tolist()

    out = Path(out)
    stem = out / f"reproduce-{preset_name}-{loader}-{cache}-{tokens}"
    command = (f"kvlab reproduce --preset {preset_name} --loader {loader} --cache {cache} --tokens {tokens} "
               f"--seed {seed} --prompt-len {prompt_len} --device {device} --out {shlex.quote(str(out))}"
               + (f" --checkpoint {shlex.quote(str(directory))}" if checkpoint is not None else ""))
    meta: dict[str, Any] = {
        "preset": preset_name, "loader": loader, "cache": cache, "tokens": tokens, "seed": seed,
        "prompt": prompt[0].tolist(), "device": str(dev), "checkpoint": str(directory),
        "config": config.to_dict(), "rerun": command, "command": " ".join(map(shlex.quote, sys.argv)),
        "torch_version": torch.__version__, "python_version": platform.python_version(),
        "platform": platform.platform(), "threads": torch.get_num_threads(),
        "generated_tokens": generated, "generated_sha256": hashlib.sha256(json.dumps(generated).encode()).hexdigest(),
        "seconds": seconds, "verdict": report.verdict, "leak_check": report.as_row(),
        "explanation": report.explanation, "columns": list(frame.columns),
    }
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, png_path = stem.with_suffix(".csv"), stem.with_suffix(".json"), stem.with_suffix(".png")
    frame.to_csv(csv_path, index=False)
    json_path.write_text(json.dumps(meta, indent=2) + "\n")
    _plot(frame, png_path, config, loader, cache)
    return Reproduction(csv_path, png_path, json_path, generated, report.leak, meta)


def _plot(frame: Any, path: Path, config: Any, loader: str, cache: str) -> None:
    """The exact timeline (:func:`kvlab.study.plotting.plot_timeline`) with the KV cache and RSS growth added."""
    from kvlab.study.plotting import plot_timeline

    fig = plot_timeline(frame[["step", "live_bytes", "peak_bytes"]], config=config, loader=loader, cache=cache)
    ax = fig.axes[0]
    mib = 2**20
    ax.plot(frame["step"], frame["cache_bytes"] / mib, color="C2", label="KV cache tensors")
    if "kv_analytic_bytes" in frame:
        ax.plot(frame["step"], frame["kv_analytic_bytes"] / mib, ":", color="k", label="KV cache, analytic")
    ax.plot(frame["step"], frame["rss_growth_bytes"] / mib, color="C3", alpha=0.6, label="RSS growth since step 0")
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=100)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from kvlab.memory.trace import fmt_bytes

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
                       description="Check a checkpoint from its headers; with --loader also load it and check "
                                   "the model for what breaks inference memory (weights requiring grad, "
                                   "copied ties, meta, mixed dtypes ...). Exit 1 when a check fails, 2 when "
                                   "the checkpoint cannot be read.")
    p.add_argument("path", help="checkpoint directory")
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

    sub.add_parser("report", help="execute the notebooks and render HTML reports (kvlab report --help)",
                   add_help=False)
    sub.add_parser("demo", help="the leak vs the fix in a few seconds (kvlab demo --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvlab`` console script and ``python -m kvlab``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":  # delegated whole, so that its own --help and options apply
        from .report import main as report_main

        return report_main(argv[1:])
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .errors import CheckpointError

    try:
        _set_threads(getattr(args, "threads", None))
        return args.func(args)
    except UsageError as exc:
        print(f"kvlab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as exc:
        print(f"kvlab {args.command}: invalid checkpoint: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"kvlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
