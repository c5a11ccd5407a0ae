"""What ``kradapter finetune`` and ``kradapter shift`` share on the command line: the recipe's flags, the
up-front checks of the device and the model folder, the one-line error, and opening the run folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from ..assets import minilm_dir
from ..store import RunSpec, Store, StoreError
from .protocol import DEVICES, HEAD_INPUTS, Recipe, SettingsError, check_device, check_max_length, check_model_dir

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
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the k-shot set (unless --steps)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps per run (replaces --epochs when given)")
    p.add_argument(
        "--head-input",
        default=d.head_input,
        choices=HEAD_INPUTS,
        help="what the classifier reads: native = the encoder's sentence-transformers pooling (1_Pooling/config.json; "
        "mean for MiniLM), pooler = transformers' own head input (BERT: tanh(dense(CLS)))",
    )
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
    p.add_argument("--allow-code-change", action="store_true", help="let --resume continue results of other code")
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
        steps=args.steps,
        head_input=args.head_input,
    )


def failer(command: str, rank: int) -> Fail:
    """A one-line error on stderr (rank 0 only) and exit status 2."""

    def fail(message: str) -> int:
        if rank == 0:
            print(f"kradapter {command}: error: {message}", file=sys.stderr)
        return 2

    return fail


def check_model(args: argparse.Namespace, recipe: Recipe, world_size: int) -> Path:
    """The device, the batch split and the model folder (its code, its length limit, its pooling when the head
    reads it), before any work."""
    if recipe.batch_size % world_size:
        raise SettingsError(f"--batch-size {recipe.batch_size} is not divisible by the {world_size} processes")
    check_device(recipe.device)
    model_dir = check_model_dir(args.model, trust_remote_code=args.trust_remote_code) if args.model else minilm_dir()
    check_max_length(model_dir, recipe.max_length)
    if recipe.head_input == "native":
        from .pooling import native_pooling

        native_pooling(model_dir)  # a folder without sentence-transformers pooling: named here, before any work
    return model_dir


def mode_of(args: argparse.Namespace) -> str:
    return "overwrite" if args.overwrite else "resume" if args.resume else "new"


def finetune_outputs(methods: Iterable[str]) -> list[str]:
    """The paths a ``kradapter finetune`` run writes in its folder (checked when the folder is opened)."""
    from .report import PLOT_FILE, RESULTS_FILE, TABLE_FILE

    return [RESULTS_FILE, TABLE_FILE, PLOT_FILE, *_run_outputs(methods)]


def shift_outputs(benchmarks: Iterable[str]) -> list[str]:
    """The paths a ``kradapter shift`` run writes in its folder (checked when the folder is opened)."""
    from .shift_report import RESULTS_FILE, report_outputs
    from .shift_settings import GROUPS

    benchmarks = list(benchmarks)
    groups = [g for g, members in GROUPS.items() if set(members) & set(benchmarks)]
    return [RESULTS_FILE, *report_outputs(benchmarks, groups), *_run_outputs(benchmarks)]


def _run_outputs(adapter_folders: Iterable[str]) -> list[str]:
    from .runner import ADAPTERS_DIR, TRAINER_DIR

    return [TRAINER_DIR, *(f"{ADAPTERS_DIR}/{f}" for f in adapter_folders)]


def open_store(
    out: str,
    spec: RunSpec,
    mode: str,
    rank: int,
    world_size: int,
    device: str,
    outputs: list[str],
    allow_code_change: bool = False,
) -> Store:
    """Rank 0 opens (and locks) the run folder; under torchrun the others wait for its verdict, then read it.
    A file or folder the run would write that is already there, written by no run, stops it here, and so does a
    resume across a code change unless ``allow_code_change`` (``--allow-code-change``)."""
    if world_size == 1:
        return Store.open(
            out, spec, mode, legacy=["finetune_results.json"], outputs=outputs, allow_code_change=allow_code_change
        )
    from .train import broadcast_object

    store, error = None, None
    if rank == 0:
        try:
            store = Store.open(
                out, spec, mode, legacy=["finetune_results.json"], outputs=outputs, allow_code_change=allow_code_change
            )
        except StoreError as exc:
            error = str(exc)
    error = broadcast_object(error, device)
    if error is not None:
        if store is not None:
            store.close()
        raise StoreError(error)
    return store if store is not None else Store.open(out, spec, mode, writer=False)
