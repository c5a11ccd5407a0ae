"""The ``kradapter`` command: ``compare`` (matrix-approximation study), ``finetune`` (real fine-tuning), ``shift``
(the distribution-shift study) and ``export`` (a KRAdapter or SinLoRA adapter as a LoRA adapter, for LoRA-only
serving).

Parsing and every check load no heavy library, so help and errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

COMMAND_MODULES = (
    "kradapter.compare.cli",
    "kradapter.finetune.cli",
    "kradapter.finetune.shift_cli",
    "kradapter.export_cli",
    "kradapter.report.cli",
)


# Optional quantization backends, which PEFT imports whenever they are installed, log at import time about kernels
# this CPU or build lacks (and torch about their enum registrations): noise unrelated to the command's work.
IMPORT_NOISE_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree")
# DeepSpeed, when installed, is imported by accelerate's probing and warns that it fell back to its CPU accelerator;
# no kradapter command runs DeepSpeed (finetune refuses a DeepSpeed launch), so that line is noise here too.
IMPORT_NOISE_MESSAGES = {"DeepSpeed": "Setting accelerator to CPU"}


class _Drop(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# Library-internal deprecations and notices users cannot act on, raised inside training: transformers' own
# gradient-checkpointing rename, and torch's note that PEFT's SHiRA builds sparse tensors without invariant checks.
IGNORED_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (UserWarning, r"Sparse invariant checks are implicitly disabled"),
)


def main(argv: list[str] | None = None) -> int:
    for category, message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in IMPORT_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, text in IMPORT_NOISE_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.text == text for f in logger.filters):
            logger.addFilter(_Drop(text))
    parser = argparse.ArgumentParser(prog="kradapter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
