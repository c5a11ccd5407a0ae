"""``kradapter export``: turn a KRAdapter or SinLoRA adapter folder into a PEFT LoRA adapter folder.

Each layer's update is cut to a truncated SVD: one rank for every layer (--rank), or per layer the smallest rank
whose relative Frobenius error is at most --max-error. Prints each layer's rank and error and the file size.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
The LoRA loads with PeftModel.from_pretrained(base, OUT). A KRAdapter update is high rank by design: a small rank
keeps only part of it (see docs/export.md for measured errors). --rank gives one LoRA rank everywhere (every LoRA
engine accepts it); --max-error gives per-layer ranks through PEFT's rank_pattern.
"""

DTYPES = ("float32", "float16", "bfloat16")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export a KRAdapter/SinLoRA adapter as a LoRA adapter (truncated SVD)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", help="folder written by save_pretrained (adapter_config.json + adapter weights)")
    p.add_argument("out", help="new folder for the LoRA adapter")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="LoRA rank of every layer")
    size.add_argument(
        "--max-error", type=float, help="per layer, the smallest rank with relative Frobenius error <= this"
    )
    p.add_argument("--base", default=None, help="base model folder (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the stored LoRA factors")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it holds files")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Validate (standard library only), then load torch/PEFT and export."""
    from .export import ExportError, check_request

    try:
        request = check_request(
            args.adapter,
            args.out,
            rank=args.rank,
            max_error=args.max_error,
            base=args.base,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except ExportError as exc:
        print(f"kradapter export: error: {exc}", file=sys.stderr)
        return 2
    from .export import load_base, load_weights, run_export

    try:
        weights = load_weights(request)  # a bad weights file is named before the base model loads
        report = run_export(request, load_base(request), weights)
    except ExportError as exc:
        print(f"kradapter export: error: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"LoRA adapter: {request.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``export`` on its own (``python -m kradapter.export_cli``)."""
    parser = argparse.ArgumentParser(prog="kradapter")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
