"""``kradapter report RESULTS_DIR [-o report.html]``: one self-contained, interactive HTML page of a results folder.

Works on the folders of ``kradapter compare`` (experimental_results.json), ``kradapter finetune``
(finetune_results.json) and the shift study (shift_results.json). The page embeds every script and style (Vega,
Vega-Lite and vega-embed from vl-convert-python), so it opens offline. A folder whose run is still going is
reported as it stands, and the page says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="an interactive, self-contained HTML report of a results folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results_dir", help="a results folder of compare, finetune or the shift study")
    p.add_argument("-o", "--out", default=None, help="the HTML file to write (default: RESULTS_DIR/report.html)")
    p.set_defaults(run=run)
    return p


def check(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, as one line, or None (standard library only)."""
    from .data import ReportError, find_results

    try:
        find_results(Path(args.results_dir))
    except ReportError as exc:
        return str(exc)
    if args.out is not None:
        out = Path(args.out)
        if out.is_dir():
            return f"output {args.out!r} is a folder; give a file name such as report.html"
        if not out.parent.is_dir():
            return f"output folder {str(out.parent)!r} does not exist"
        if out.suffix.lower() not in (".html", ".htm"):
            return f"output {args.out!r} must end in .html"
    return None


def run(args: argparse.Namespace) -> int:
    from .data import ReportError

    problem = check(args)
    if problem is not None:
        print(f"kradapter report: error: {problem}", file=sys.stderr)
        return 2
    from . import build_report

    try:
        path = build_report(args.results_dir, args.out)
    except ReportError as exc:
        print(f"kradapter report: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0
