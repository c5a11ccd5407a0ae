"""``kradapter shift``: train on a source domain, test in and out of distribution, every adapter at an equal
budget (:mod:`kradapter.finetune.shift`).

The recipe's flags are ``kradapter finetune``'s; flags, the device, the model folder and the benchmarks' data are
checked, and every cell planned, before any training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import registry
from ..assets import MissingPackageError
from ..executor import add_executor_arguments
from ..store import RUN_FILE, Store, StoreError, file_hash
from .commands import (
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
from .shift_settings import (
    ANCHOR,
    BASELINES,
    DEFAULT_PRESET,
    GROUPS,
    MIN_GRID_RATES,
    NEWSGROUP_TASKS,
    PRESETS,
    StudySettings,
)

if TYPE_CHECKING:
    from .shift import Study


def _preset_line(name: str) -> str:
    p = PRESETS[name]
    contenders = f"; contenders {' '.join(p['contenders'])}" if p["contenders"] else ""
    return (
        f"  {name}: {' '.join(p['benchmarks']) if len(p['benchmarks']) < 3 else 'every benchmark'}; "
        f"{' '.join(p['methods'])}{contenders}; shots {' '.join(map(str, p['shots']))}; "
        f"budgets {' '.join(f'{x}x' for x in p['budgets'])}; {len(p['seeds'])} seeds; "
        f"{p['steps'] or 'fit_steps'} steps; "
        f"--val-shots {p['val_shots']}; --eval-per-class {p['eval_per_class']}"
    )


EPILOG = f"""\
benchmarks: sentiment (train on movie reviews; test on held-out movie reviews, Amazon reviews, tweets, NYT
editorials), topic (train on BBC News; test on held-out BBC and 20 Newsgroups), and the six 20 Newsgroups
cross-domain tasks of Dai et al. (KDD 2007), trained on some subgroups of two top categories and tested on
held-out source texts and on the other subgroups (the domain 'target'):
  {" ".join(NEWSGROUP_TASKS)}
groups: {"; ".join(f"{g} = the {len(m)} tasks above" for g, m in GROUPS.items())}.
presets (default {DEFAULT_PRESET}; any flag overrides its preset value; times in docs/shift.md):
{chr(10).join(_preset_line(name) for name in PRESETS)}
tuning: every method's learning rate is tuned in every cell on the first seed (its registry grid of at least
{MIN_GRID_RATES} log-spaced rates, extended while the best is an edge; the same number of trials for every method).
--methods must include {ANCHOR}: every comparison is against it. Methods tagged shift-anchor-cell
({", ".join(registry.tagged("shift-anchor-cell"))}) and --contenders run in each benchmark's anchor cell only.
The reference rows {" and ".join(BASELINES)} run in every cell and seed (not flags).
methods: {registry.methods_help(("adapter", "baseline"))}.
"""


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_recipe_arguments(p, "shift_out")
    p.add_argument("--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET, help="study preset (default: reduced)")
    p.add_argument(
        "--benchmarks", nargs="+", default=None, help=f"benchmarks or groups ({', '.join(GROUPS)}); see below"
    )
    p.add_argument("--contenders", nargs="+", default=None, help="anchor-cell-only methods ('none': none)")
    budget = registry.budget_method().label
    p.add_argument("--budgets", nargs="+", type=ints, default=None, help=f"multiples of {budget}'s count")
    p.add_argument("--anchor-shots", type=int, default=None, help="shots of the cell that also runs the contenders")
    p.add_argument("--eval-per-class", type=int, default=None, help="evaluation texts per class (0: all)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="print the tables of the records in --out so far (its run going on, stopped or finished) and exit: "
        "trains nothing and writes nothing; the settings must be the run's",
    )
    add_executor_arguments(p)
    p.set_defaults(val_shots=None, run=run)  # --val-shots: the preset's (100 per class outside reduced)
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
    """The settings: each flag not given takes the preset's value (``--steps`` and ``--val-shots`` too)."""
    preset = PRESETS[args.preset]
    if args.val_shots is None:
        args.val_shots = preset["val_shots"]
    if args.steps is None:
        args.steps = preset["steps"]
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
        preset=args.preset,
    )


def run(args: argparse.Namespace) -> int:
    """Settings, device, model and data checked, then every cell planned, before any training."""
    from .runner import check_executor
    from .shift import Study
    from .shift_data import benchmark_data, data_hash, load_benchmark

    rank, world_size = world()
    fail = failer("shift", rank)
    try:
        check_launch()
        if args.report_only:  # before the data and model load: a wrong folder answers at once
            if args.overwrite:
                raise SettingsError("--report-only reads --out and writes nothing: it cannot be given with --overwrite")
            if not (Path(args.out) / RUN_FILE).is_file():
                raise StoreError(f"--report-only: {args.out} holds no run ({RUN_FILE} is missing): check --out")
        settings = settings_from(args)
        executor = check_executor(args, world_size)
        model_dir = check_model(args, settings.recipe, world_size)
        data = {b: benchmark_data(load_benchmark(b), settings.eval_per_class) for b in settings.benchmarks}
        # every cell planned and every method sized (shots a class cannot supply, a variant's rank a layer cannot
        # honour) before the folder is touched
        name = Path(args.model).name if args.model else MODEL_NAME
        study = Study(settings, model_dir, name, data, args.trust_remote_code)
        inputs = {"model": file_hash(model_dir), **{f"data.{b}": data_hash(d) for b, d in data.items()}}
        if args.report_only:
            return report_only(study, _read(args.out, settings, inputs))
        outputs = shift_outputs(settings.benchmarks)
        store = open_store(
            args.out,
            settings.run_spec(inputs),
            mode_of(args),
            rank,
            world_size,
            settings.recipe.device,
            outputs,
            allow_code_change=args.allow_code_change,
        )
    except (MissingPackageError, StoreError, SettingsError, ValueError) as exc:
        return fail(str(exc))
    with store:
        return execute(study, store, args, executor)


def _read(out: str, settings: StudySettings, inputs: dict[str, str]) -> Store:
    """The run in ``out`` for ``--report-only``; refused with other settings, naming the run's preset if it differs."""
    try:
        return Store.read(out, settings.run_spec(inputs))
    except StoreError as exc:
        try:
            preset = json.loads((Path(out) / RUN_FILE).read_text())["settings"]["preset"]
        except (OSError, ValueError, KeyError, TypeError):
            raise exc from None
        if preset != settings.preset:
            raise StoreError(f"{exc} (the run's preset is {preset}: pass --preset {preset})") from None
        raise


def report_only(study: Study, store: Store) -> int:
    """The tables of a run folder's finished units, printed (``--report-only``); nothing runs, nothing is written."""
    from .shift_report import document, markdown

    done = sum(1 for key, record in store.records.items() if key[2] != "chosen" and store.done(key))
    print(f"{store.directory}: {done} of {study.units()} units finished", file=sys.stderr)
    print(markdown(document(store, study)))
    return 0


def execute(study: Study, store: Store, args: argparse.Namespace, executor: Any = None) -> int:
    """Run the planned study into ``store``: the results document after each unit, the tables and plots at the end."""
    from ..executor import ExecutorError
    from ..records import environment
    from .runner import check_executor, report_failures, with_fingerprint
    from .shift_report import RESULTS_FILE, document, write_reports

    rank, world_size = world()
    fail = failer("shift", rank)
    started = time.perf_counter()
    store.set_environment({**environment(), "world_size": world_size})
    if not args.quiet and rank == 0:
        print(f"shift study: {len(study.cells)} cells, {study.units()} trainings or evaluations", file=sys.stderr)

    def report(_: Any) -> None:
        if rank == 0:
            store.write_json(RESULTS_FILE, document(store, study), indent=1)

    executor = with_fingerprint(executor or check_executor(args, world_size), study.model_dir)
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
