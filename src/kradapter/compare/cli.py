"""``kradapter compare``: the matrix-approximation study from a TOML file and/or flags."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, StudyConfig, load_config, with_changes


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        rows, cols = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 1024x768, got {text!r}") from None
    return rows, cols


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(p) for p in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 42,43,44, got {text!r}") from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        help="matrix-approximation study: each PEFT method's update fitted to target matrices",
        description=(
            "Fit each PEFT method's weight update to target matrices at an equal parameter budget and compare "
            "spectral error and effective rank. With no arguments: the seed's default study, offline, into results/."
        ),
    )
    parser.add_argument("--config", type=Path, help="a TOML study file (see examples/study.toml)")
    parser.add_argument("--size", type=_size, help="synthetic matrix size ROWSxCOLS (default 1024x768)")
    parser.add_argument("--iterations", type=int, help="optimisation steps per cell (default 300)")
    parser.add_argument("--methods", type=_names, help="comma-separated: lora,sinlora,kradapter,randlora,kronecker")
    parser.add_argument("--matrices", type=_names, help="comma-separated matrix types (see docs/compare.md)")
    parser.add_argument("--seeds", type=_seeds, help="comma-separated seeds; several give mean and std (default 42)")
    parser.add_argument("--out", type=str, help="output directory (default results/)")
    parser.add_argument("--device", type=str, help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--dtype", type=str, help="float32 (default), float64 or bfloat16")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--resume", action="store_true", help="keep finished cells of --out's results and run the rest")
    parser.add_argument("--no-plots", action="store_true", help="write the JSON and the table only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
    return parser


def build_config(args: argparse.Namespace) -> StudyConfig:
    """The config file (or the defaults) with the flags applied; errors name the bad flag or key."""
    config = load_config(args.config) if args.config else StudyConfig()
    changes: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            changes.setdefault(section, {})[key] = value

    put("matrices", "size", args.size)
    put("matrices", "types", args.matrices)
    put("methods", "names", args.methods)
    put("training", "iterations", args.iterations)
    put("training", "seeds", args.seeds)
    put("output", "directory", args.out)
    put("runtime", "device", args.device)
    put("runtime", "dtype", args.dtype)
    put("runtime", "threads", args.threads)
    if args.no_plots:
        put("output", "plots", False)
    return with_changes(config, **changes) if changes else config


def run(args: argparse.Namespace) -> int:
    from .plots import summary_table, write_plots
    from .study import run_study

    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"kradapter compare: configuration error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        results = run_study(config, resume=args.resume, progress=not args.quiet)
    except (ValueError, RuntimeError) as exc:
        print(f"kradapter compare: {exc}", file=sys.stderr)
        return 2
    written = [results.path]
    if config.output.plots:
        written += write_plots(results.data, config)
    if config.output.table:
        print(summary_table(results.data, config))
    print(f"\n{time.perf_counter() - start:.1f} s; wrote " + ", ".join(str(p) for p in written))
    return 0
