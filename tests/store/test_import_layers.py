"""The package's layers, read from its source: no module imports a layer above its own, the two studies never
import each other, and no two modules import each other (directly or through others).

Layers, lowest first (``docs/design.md``): the maths and the floor (``khatri_rao``, ``sinlora``, ``shape``,
``guards``, ``files``) -> ``layer`` -> ``tuners`` -> the shared services (``registry``, ``store``, ``analysis``,
``stats``, ``plotting``, ``assets``, ``records``, ``export``) -> the studies (``compare/``, ``finetune/``) -> the
command lines (``cli``, ``export_cli``, ``compare/cli``, ``finetune/cli``). Imports inside functions and under
``TYPE_CHECKING`` count: they are dependencies all the same. The package's ``__init__`` (lazy names of the library,
loaded by ``importlib``) is checked apart: it never names a study.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "kradapter"
SRC = Path(__file__).resolve().parents[2] / "src" / PACKAGE

LAYERS: dict[str, int] = {
    **dict.fromkeys(("khatri_rao", "sinlora", "shape", "guards", "files"), 0),
    "layer": 1,
    "tuners": 2,
    **dict.fromkeys(
        ("registry", "store", "analysis", "stats", "plotting", "assets", "records", "export", "intruders", "executor"),
        3,
    ),
    **dict.fromkeys(("compare", "finetune", "report", "method_comparison"), 4),
    **dict.fromkeys(("cli", "export_cli"), 5),
}
STUDIES = ("compare", "finetune")


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted name -> file of every module of the package."""
    return {module_name(p, src): p for p in sorted(src.rglob("*.py"))}


def _type_only(tree: ast.AST) -> set[int]:
    """Ids of the import nodes under ``if TYPE_CHECKING:`` (never run)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _imports(path: Path, name: str, known: set[str], runtime: bool) -> Iterator[str]:
    """The package modules ``path`` (module ``name``) imports, anywhere in it (``runtime``: not those imported
    for type checking only)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_only(tree) if runtime else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
            for base in bases:
                while base and base not in known:
                    base = base.rpartition(".")[0]
                if base:
                    yield base
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in known else base
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target:
                    yield target


def import_graph(src: Path = SRC, runtime: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports (itself and its own parent packages left out; ``runtime``: the
    imports that run, not those for type checking only, which cannot make an import cycle)."""
    found = modules(src)
    known = set(found)
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        targets = set(_imports(path, name, known, runtime))
        graph[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    return graph


def layer(name: str) -> int | None:
    """The layer of a module, or None for the package's own ``__init__``."""
    parts = name.split(".")[1:]
    if not parts:
        return None
    if parts[0] in (*STUDIES, "report") and parts[-1] == "cli":
        return LAYERS["cli"]
    return LAYERS[parts[0]]


def study(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STUDIES else None


def upward_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports of a module in a higher layer, and imports between the two studies."""
    out = []
    for source, targets in graph.items():
        for target in targets:
            low, high = layer(source), layer(target)
            if low is None or high is None:
                continue
            across = study(source) is not None and study(target) is not None and study(source) != study(target)
            if high > low or across:
                out.append((source, target))
    return sorted(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                group.append(item)
                if item == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in modules() if m != PACKAGE and m.split(".")[1] not in LAYERS]
    assert not unplaced, f"place these modules in LAYERS (and docs/design.md): {unplaced}"


def test_no_module_imports_a_layer_above_its_own() -> None:
    assert upward_arrows(import_graph()) == []


def test_the_studies_never_import_each_other() -> None:
    graph = import_graph()
    across = [(s, t) for s, ts in graph.items() for t in ts if study(s) and study(t) and study(s) != study(t)]
    assert across == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph(runtime=True)) == []


def test_the_package_root_names_no_study() -> None:
    text = (SRC / "__init__.py").read_text(encoding="utf-8")
    assert not any(f".{study}" in text.replace(f"``kradapter.{study}``", "") for study in STUDIES)


def test_the_checks_see_an_upward_arrow_and_a_cycle(tmp_path: Path) -> None:
    """The graph builder on a made-up package: a relative import from the maths up to a study, and a cycle."""
    pkg = tmp_path / PACKAGE
    (pkg / "compare").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "compare" / "__init__.py").write_text("")
    (pkg / "compare" / "study.py").write_text("from .. import guards\nfrom ..store import Store\n")
    (pkg / "guards.py").write_text("def f():\n    from .compare.study import run\n")
    (pkg / "store.py").write_text("import kradapter.compare.study\n")
    (pkg / "stats.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .compare import study\n"
    )
    graph = import_graph(pkg)
    assert (
        graph["kradapter.stats"] == {"kradapter.compare.study"}
        and import_graph(pkg, runtime=True)["kradapter.stats"] == set()
    )
    assert graph["kradapter.guards"] == {"kradapter.compare.study"}
    assert graph["kradapter.compare.study"] == {"kradapter.guards", "kradapter.store"}
    assert upward_arrows(graph) == [
        ("kradapter.guards", "kradapter.compare.study"),
        ("kradapter.stats", "kradapter.compare.study"),
        ("kradapter.store", "kradapter.compare.study"),
    ]
    assert cycles(graph) == [["kradapter.compare.study", "kradapter.guards", "kradapter.store"]]


@pytest.mark.parametrize("name", ["kradapter.compare.cli", "kradapter.finetune.cli", "kradapter.cli"])
def test_command_lines_are_the_top_layer(name: str) -> None:
    assert layer(name) == max(LAYERS.values())
