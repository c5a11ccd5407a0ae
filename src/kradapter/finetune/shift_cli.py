"""``kradapter shift``: train on a source domain, test in and out of distribution, every adapter at an equal
budget (:mod:`kradapter.finetune.shift`).

The recipe's flags are ``kradapter finetune``'s; flags, the device, the model folder and the benchmarks' data are
checked, and every cell planned, before any training.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .. import registry
from ..assets import MissingPackageError
from ..executor import add_executor_arguments
from ..store import Store, StoreError, file_hash
from .commands import (
    Fail,
    add_recipe_arguments,
    check_model,
    failer,
    flat,
    ints,
    mode_of,
    open_store,
    recipe_from,
    shift_outputs,
)
from .data import MODEL_NAME
from .protocol import SettingsError, check_launch, parse_lr_grid, world
from .shift_settings import ANCHOR, BENCHMARKS, FULL, PRESETS, REDUCED, StudySettings

EPILOG = f"""\
benchmarks: sentiment (train on movie reviews; test on held-out movie reviews, Amazon reviews, tweets, NYT
editorials) and topic (train on BBC News; test on held-out BBC and 20 Newsgroups). Presets: reduced (default:
{" ".join(REDUCED["methods"])}; 32 shots; 5 seeds; 17 minutes on 2 CPU cores) and full ({" ".join(FULL["methods"])};
shots 8 32 128, budgets 1x and 4x, contenders {" ".join(FULL["contenders"])}); any flag overrides its preset
value. --methods must include {ANCHOR}: every comparison is against it.
methods: {registry.methods_help("adapter")}.
"""


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_recipe_arguments(p, "shift_out")
    p.add_argument("--preset", choices=tuple(PRESETS), default="reduced", help="study preset (default: reduced)")
    p.add_argument("--benchmarks", nargs="+", default=None, help=f"of {', '.join(BENCHMARKS)}")
    p.add_argument("--contenders", nargs="+", default=None, help="anchor-cell-only adapters ('none': none)")
    budget = registry.budget_method().label
    p.add_argument("--budgets", nargs="+", type=ints, default=None, help=f"multiples of {budget}'s count")
    p.add_argument("--anchor-shots", type=int, default=None, help="shots of the learning-rate sweep cell")
    p.add_argument("--eval-per-class", type=int, default=None, help="evaluation texts per class (0: all)")
    add_executor_arguments(p)
    p.set_defaults(run=run)
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    help_text = "distribution-shift study: in- and out-of-distribution accuracy of adapters"
    return configure(subparsers.add_parser("shift", help=help_text, **_texts()))


def build_parser() -> argparse.ArgumentParser:
    """The command's parser on its own (for ``kradapter finetune --study shift``, the old spelling)."""
    return configure(argparse.ArgumentParser(prog="kradapter shift", **_texts()))


def _texts() -> dict[str, Any]:
    return {
        "description": __doc__,
        "epilog": EPILOG,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def settings_from(args: argparse.Namespace) -> StudySettings:
    preset = PRESETS[args.preset]
    return StudySettings(
        recipe_from(args),
        benchmarks=tuple(args.benchmarks or preset["benchmarks"]),
        methods=tuple(args.methods or preset["methods"]),
        contenders=tuple(c for c in (args.contenders or preset["contenders"]) if c.lower() != "none"),
        seeds=flat(args.seeds) or preset["seeds"],
        shots=flat(args.shots) or preset["shots"],
        anchor_shots=args.anchor_shots,
        budgets=flat(args.budgets) or preset["budgets"],
        eval_per_class=preset["eval_per_class"] if args.eval_per_class is None else args.eval_per_class,
        lr_grids=parse_lr_grid(args.lr_grid),
    )


def run(args: argparse.Namespace) -> int:
    """Settings, device, model and data checked, then every cell planned, before any training."""
    from .runner import check_executor
    from .shift import check_data
    from .shift_data import benchmark_data, data_hash, load_benchmark

    rank, world_size = world()
    fail = failer("shift", rank)
    try:
        check_launch()
        settings = settings_from(args)
        executor = check_executor(args, world_size)
        model_dir = check_model(args, settings.recipe, world_size)
        data = {b: benchmark_data(load_benchmark(b), settings.eval_per_class) for b in settings.benchmarks}
        check_data(settings, data)  # shots that a class cannot supply stop here, before the folder is touched
        inputs = {"model": file_hash(model_dir), **{f"data.{b}": data_hash(d) for b, d in data.items()}}
        outputs = shift_outputs(settings.benchmarks)
        store = open_store(
            args.out, settings.run_spec(inputs), mode_of(args), rank, world_size, settings.recipe.device, outputs
        )
    except (MissingPackageError, StoreError, SettingsError, ValueError) as exc:
        return fail(str(exc))
    with store:
        return execute(settings, store, model_dir, data, args, fail, executor)


def execute(settings: StudySettings, store: Store, model_dir: Path, data: Any, args: argparse.Namespace,
            fail: Fail, executor: Any = None) -> int:  # fmt: skip
    from ..executor import ExecutorError
    from ..records import environment
    from .runner import check_executor, report_failures, with_fingerprint
    from .shift import Study
    from .shift_report import RESULTS_FILE, document, write_reports

    rank, world_size = world()
    started = time.perf_counter()
    store.set_environment({**environment(), "world_size": world_size})
    try:
        name = Path(args.model).name if args.model else MODEL_NAME
        study = Study(settings, model_dir, name, data, args.trust_remote_code)
    except (SettingsError, ValueError) as exc:
        return fail(str(exc))
    if not args.quiet and rank == 0:
        print(f"shift study: {len(study.cells)} cells, {study.units()} trainings or evaluations", file=sys.stderr)

    def report(_: Any) -> None:
        if rank == 0:
            store.write_json(RESULTS_FILE, document(store, study), indent=1)

    executor = with_fingerprint(executor or check_executor(args, world_size), model_dir)
    try:
        with executor:
            failed = study.run(store, report, rank, world_size, not args.quiet, executor=executor)
    except ExecutorError as exc:
        return fail(str(exc))
    store.finish(wall_s=round(time.perf_counter() - started, 3), failed=len(failed), executor=executor.describe())
    if rank == 0:
        results = document(store, study)
        store.write_json(RESULTS_FILE, results, indent=1)
        print(write_reports(results, store))
        print(f"results: {store.path(RESULTS_FILE)}")
    return report_failures("shift", failed, rank)
