"""The shape of ``kradapter.finetune``: method facts come from the registry, the kinds of training are told apart
in one place, and no module imports another that imports it back (checked on the source, so they stay true)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from kradapter import registry

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "kradapter" / "finetune"
SHIMS = {"updates.py"}  # re-exports kept for old imports; no code of their own


def sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(PACKAGE.glob("*.py")) if p.name not in SHIMS}


def test_no_method_is_named_in_quotes_outside_the_registry() -> None:
    names = {alias for method in registry.METHODS.values() for alias in (method.name, *method.aliases)}
    alternatives = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    quoted = re.compile(rf"""["']({alternatives})["']""")
    hits = [f"{name}:{i}: {line.strip()}" for name, text in sources().items()
            for i, line in enumerate(text.splitlines(), 1)
            if quoted.search(line)]  # fmt: skip
    assert hits == []


def test_only_the_strategies_tell_the_kinds_of_training_apart() -> None:
    asking = re.compile(r"\.(is_adapter|trains_base)\b|\.kind\b")
    assert [name for name, text in sources().items() if asking.search(text)] == ["strategies.py"]


def imports(text: str) -> set[str]:
    """Sibling modules imported at run time (anywhere in the module, not under ``TYPE_CHECKING``)."""
    tree = ast.parse(text)
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}  # fmt: skip
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in typing_only:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return out


def test_no_import_cycle_and_the_executor_does_not_import_a_report() -> None:
    graph = {
        name[:-3]: {m for m in imports(text) if (PACKAGE / f"{m}.py").exists()} for name, text in sources().items()
    }
    assert not graph["runner"] & {"report", "shift_report", "cli", "shift_cli"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(m == goal or (m not in seen and reaches(m, goal, seen | {m})) for m in graph.get(start, ()))

    assert [m for m in graph if reaches(m, m, set())] == []
