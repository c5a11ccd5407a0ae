"""``kradapter compare``: the matrix-approximation study from a TOML file and/or flags.

Everything is checked before any heavy library loads: flags, the study file, input files and the output folder
(:mod:`kradapter.store`); torch, PEFT and matplotlib are imported only to run the study.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from ..assets import MissingPackageError
from ..executor import Executor, ExecutorError, add_executor_arguments, executor_from_args
from ..registry import methods_help
from ..store import Store, StoreError
from .config import ConfigError, StudyConfig, load_config, with_changes
from .inputs import MissingInputError, run_spec


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
            "spectral error and effective rank. With no arguments: the published default study, offline, into results/."
        ),
    )
    parser.add_argument("--config", type=Path, help="a TOML study file (see examples/study.toml)")
    parser.add_argument("--size", type=_size, help="synthetic matrix size ROWSxCOLS (default 1024x768)")
    parser.add_argument("--iterations", type=int, help="optimisation steps per cell (default 300)")
    parser.add_argument(
        "--methods", type=_names, help=f"comma-separated, from: {methods_help('adapter', default='compare-default')}"
    )
    parser.add_argument("--matrices", type=_names, help="comma-separated matrix types (see docs/compare.md)")
    parser.add_argument("--seeds", type=_seeds, help="comma-separated seeds; several give mean and std (default 42)")
    parser.add_argument("--out", type=str, help="output folder (default results/)")
    parser.add_argument("--device", type=str, help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    parser.add_argument("--dtype", type=str, help="float32 (default), float64 or bfloat16")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads of each cell (default 1: docs/executor.md); same as --threads-per-unit",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue the study in --out (same settings; may add "
        "matrices, methods or seeds); starts it if --out holds none",
    )
    mode.add_argument("--overwrite", action="store_true", help="delete the results in --out first")
    parser.add_argument("--allow-code-change", action="store_true", help="let --resume continue results of other code")
    parser.add_argument("--no-plots", action="store_true", help="write the JSON and the table only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_executor_arguments(parser)
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
    def fail(message: str) -> int:
        print(f"kradapter compare: error: {message}", file=sys.stderr)
        return 2

    try:
        config = build_config(args)
        executor = study_executor(args, config)
        spec = run_spec(config)
        mode = "overwrite" if args.overwrite else "resume" if args.resume else "new"
        out = config.output
        outputs = [out.results_file, *((out.plot_file, out.spectra_file, out.effective_rank_file) if out.plots else ())]
        store = Store.open(
            out.directory,
            spec,
            mode,
            legacy=[out.results_file],
            outputs=outputs,
            allow_code_change=args.allow_code_change,
        )
    except (ConfigError, MissingInputError, MissingPackageError, StoreError) as exc:
        return fail(str(exc))
    with store:
        return _run(config, store, not args.quiet, fail, executor)


def study_executor(args: argparse.Namespace, config: StudyConfig) -> Executor:
    """Where the cells run (``--executor`` and friends), checked before any work; a ConfigError names the flag.

    ``--threads`` (``runtime.threads``) and ``--threads-per-unit`` are one setting: each cell's torch threads.
    """
    from .study import unit_threads

    given = getattr(args, "threads_per_unit", None)
    if given is not None and config.runtime.threads and given != config.runtime.threads:
        raise ConfigError(
            f"--threads-per-unit {given} disagrees with --threads/runtime.threads {config.runtime.threads}; give one"
        )
    executor_name = getattr(args, "executor", "sequential") or "sequential"
    if executor_name == "ray" and config.runtime.device != "cpu":
        raise ConfigError(
            f"--executor ray runs cells on CPU workers; --device {config.runtime.device} needs the sequential executor"
        )
    resolved = argparse.Namespace(**{**vars(args), "threads_per_unit": unit_threads(config, given)})
    return executor_from_args(resolved, ConfigError)


# Optional quantisation back-ends that PEFT and transformers import when installed. The matrix study fits plain
# nn.Linear layers and never uses them; bitsandbytes alone (through transformers' FSDP helpers) is about a sixth of
# the command's import time (BENCHMARKS.md). Marked absent in this process only, and only if not yet imported.
UNUSED_BY_THE_STUDY = ("bitsandbytes", "torchao")


def skip_unused_imports() -> None:
    """Make ``import bitsandbytes`` / ``import torchao`` fail fast (PEFT treats them as not installed)."""
    for name in UNUSED_BY_THE_STUDY:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def _run(config: StudyConfig, store: Store, progress: bool, fail: Any, executor: Executor | None = None) -> int:
    skip_unused_imports()
    import torch

    from ..executor import SequentialExecutor
    from ..records import environment
    from .matrices import MatrixError
    from .study import run_study, unit_threads

    start = time.perf_counter()
    executor = executor or SequentialExecutor(unit_threads(config))
    torch.set_num_threads(getattr(executor, "threads_per_unit", None) or unit_threads(config))
    store.set_environment({**environment(), **executor.describe()})
    try:
        results, failed = run_study(config, store, progress=progress, executor=executor)
    except ExecutorError as exc:  # a cluster that cannot be started or reached: before any cell
        return fail(str(exc))
    except (ValueError, RuntimeError, MatrixError) as exc:
        return fail(str(exc))
    written = [config.output.results_file]
    if config.output.plots:
        from .plots import plot_files, write_plots

        with contextlib.ExitStack() as listed:  # each plot listed in run.json before it is drawn
            for name in plot_files(config):
                listed.enter_context(store.writing(name))
            written += write_plots(results, config)
    if config.output.table:
        from .plots import summary_table

        print(summary_table(results, config))
    store.finish(cells_failed=len(failed), seconds=round(time.perf_counter() - start, 3))
    paths = ", ".join(str(store.path(n)) for n in written)
    print(f"\n{time.perf_counter() - start:.1f} s; wrote {paths}")
    if failed:
        print(
            f"kradapter compare: {len(failed)} cell(s) failed (recorded; --resume tries them again):", file=sys.stderr
        )
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0
