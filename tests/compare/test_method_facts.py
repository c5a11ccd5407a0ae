"""registry.py is the one source of method facts: no other module of the package, the benchmarks or the examples
names a method in quotes, and a method registered at run time is everywhere a method is listed (``--help``, the
default lists, a study) without another line changing."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kradapter import registry

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("src", "benchmarks", "examples")
SOURCE = ROOT / "src" / "kradapter" / "registry.py"

# Quoted strings equal to a method name that are not a method, with why; each must still occur (checked below).
ALLOWED: dict[tuple[str, str], str] = {
    ("src/kradapter/cli.py", "kradapter"): "the program's name (argparse prog)",
    ("src/kradapter/export_cli.py", "kradapter"): "the program's name (argparse prog)",
    ("src/kradapter/records.py", "kradapter"): "the package whose version a run records",
    ("src/kradapter/records.py", "HEAD"): "git's HEAD (the commit a run records), not the head-only method",
    ("src/kradapter/method_comparison.py", "kradapter"): "the package whose version a result file records",
    ("src/kradapter/executor.py", "kradapter"): "the package whose version a worker must share with the driver",
    ("src/kradapter/__init__.py", "sinlora"): "the module kradapter.sinlora in the lazy import table",
    ("src/kradapter/tuners/__init__.py", "KRADAPTER"): "PEFT's peft_type key; the tuners sit below the registry",
    ("src/kradapter/tuners/__init__.py", "SINLORA"): "PEFT's peft_type key; the tuners sit below the registry",
    ("src/kradapter/tuners/kradapter/config.py", "KRADAPTER"): "PEFT's peft_type of the tuner",
    ("src/kradapter/tuners/sinlora/config.py", "SINLORA"): "PEFT's peft_type of the tuner",
    ("benchmarks/published_study_speed.py", "LoRA"): "the authors' script's own label (another program's words)",
    ("benchmarks/published_study_speed.py", "SinLoRA"): "the authors' script's own label",
    ("benchmarks/published_study_speed.py", "RandLoRA"): "the authors' script's own label",
    ("benchmarks/published_study_speed.py", "kradapter"): "the program's name, the other side of the comparison",
}


def checked_files() -> list[Path]:
    return sorted(p for root in CHECKED for p in (ROOT / root).rglob("*.py") if p != SOURCE)


def quoted_names(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of every string constant in ``path`` equal (any case) to a method name or alias."""
    spellings = set(registry.aliases())
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in spellings:
            yield node.lineno, node.value


def offences(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    return [f"{rel}:{line}: {text!r}" for line, text in quoted_names(path) if (rel, text) not in ALLOWED]


@pytest.mark.parametrize("path", checked_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_method_is_named_outside_the_registry(path: Path) -> None:
    """Read a method's facts from the registry (``registry.tagged``, ``budget_method``, ``reference_adapter``)."""
    assert offences(path) == []


def test_every_allowed_name_still_occurs() -> None:
    found = {(p.relative_to(ROOT).as_posix(), text) for p in checked_files() for _, text in quoted_names(p)}
    assert sorted(set(ALLOWED) - found) == []


def test_the_check_sees_a_quoted_name(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('if spec.method == "LoKr":\n    rank = {"lora": 8}\nlabel = "lora-merged"\n')
    assert [text for _, text in quoted_names(sample)] == ["LoKr", "lora"]


# -- a method added at run time --------------------------------------------------------------------------------------

DUMMY = "dummyrank"


@pytest.fixture
def dummy() -> Iterator[registry.Method]:
    """A method registered for one test: the reference adapter's maths (a rank-r update) under a new name, in both
    studies' default lists; removed afterwards."""
    base = registry.get(registry.reference_adapter())
    entry = dataclasses.replace(
        base,
        name=DUMMY,
        label="Dummy rank",
        aliases=("dummy",),
        tags=frozenset({"compare-default", "finetune-default"}),
        positions={},
    )
    registry.METHODS[DUMMY] = entry
    try:
        yield entry
    finally:
        del registry.METHODS[DUMMY]


def _main(argv: list[str]) -> tuple[int, str]:
    from kradapter.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return int(code or 0), out.getvalue() + err.getvalue()


def test_a_new_method_is_in_the_compare_help(dummy: registry.Method) -> None:
    code, text = _main(["compare", "--help"])
    assert code == 0 and DUMMY in text and "also dummy" in " ".join(text.split())
    assert DUMMY in registry.methods_help("adapter") and DUMMY not in registry.methods_help("baseline")


def test_a_new_method_is_in_the_default_lists(dummy: registry.Method) -> None:
    from kradapter.compare.config import StudyConfig

    assert registry.tagged("compare-default")[-1] == DUMMY
    assert registry.tagged("finetune-default")[-1] == DUMMY  # no position: after the ordered ones
    assert DUMMY in registry.DEFAULT_ADAPTERS and DUMMY in registry.ADAPTERS
    assert StudyConfig().methods.names[-1] == DUMMY
    assert registry.get("DUMMY") is dummy  # its alias, any case


def test_the_dummy_is_gone_after_the_test() -> None:
    assert DUMMY not in registry.METHODS and DUMMY not in registry.tagged("compare-default")
    with pytest.raises(registry.MethodError, match="unknown method 'dummy'"):
        registry.get("dummy")


def test_a_new_method_runs_in_a_one_cell_study(dummy: registry.Method, tmp_path: Path) -> None:
    rows, cols = 23, 17
    out = tmp_path / "study"
    argv = ["compare", "--size", f"{rows}x{cols}", "--iterations", "5", "--methods", "dummy"]
    code, text = _main([*argv, "--matrices", "random_noise", "--out", str(out), "--no-plots", "--quiet"])
    assert code == 0, text
    results = json.loads((out / "experimental_results.json").read_text())
    assert results["config"]["methods"]["names"] == [DUMMY]
    record = results["results"]["random_noise"]["methods"][DUMMY]
    budget = registry.budget_method().count([(rows, cols)], factorization="sqrt_max")  # the study's default
    found = registry.plan(DUMMY, [(rows, cols)], budget, strict=False)
    assert record["params"] == found.count == dummy.count([(rows, cols)], **found.settings)
    assert 0.0 < record["relative_frobenius_error"] <= 1.0 + 1e-6
