"""The ``kradapter`` command: ``compare`` (matrix-approximation study), ``finetune`` (real fine-tuning) and
``export`` (a KRAdapter or SinLoRA adapter as a LoRA adapter, for LoRA-only serving).

Parsing and every check load no heavy library, so help and errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("kradapter.compare.cli", "kradapter.finetune.cli", "kradapter.export_cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kradapter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
