"""Time and error of an optimum solver (KRAdapter's per-row, or LoKr's), this tree's against another revision's.

    python benchmarks/optimum_speed.py [--method METHOD] [--shape 4096x11008]
                                       [--factorization sqrt_max] [--against REV] [--rounds 1] [--threads 1]
                                       [--seed 0]

One Gaussian target. ``--method`` is a method with an optimum row (the registry's ``optimum_of``; default the
budget method, KRAdapter): for KRAdapter ``kradapter_factors`` alone (the rows laid out once, outside the timing);
for LoKr ``nearest_kronecker`` with the factor shapes and ranks the study's registry gives it at this shape and
budget. With ``--against``, ``compare/optima.py`` at git revision ``REV`` is loaded beside this tree's and the
two alternate round by round. Prints each solver's median seconds, its squared error, the relative error and the
certified lower bound, and the time ratio. This is how the 4096x11008 figures in BENCHMARKS.md were taken
(``--against c8e055c``; LoKr ``--against e3837c2``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from peft.tuners.lokr import LoKrLayer

from kradapter import registry
from kradapter.compare import optima
from kradapter.compare.config import StudyConfig
from kradapter.compare.fit import inject
from kradapter.compare.study import plan_method
from kradapter.shape import KhatriRaoShape

ROOT = Path(__file__).resolve().parent.parent


def _shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected ROWSxCOLS, e.g. 4096x11008") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: both sides must be positive")
    return rows, cols


def _revision(rev: str) -> ModuleType:
    """``compare/optima.py`` as it was at ``rev``, importable beside this tree's (relative imports made absolute)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{rev}:src/kradapter/compare/optima.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except subprocess.CalledProcessError as error:
        sys.exit(f"--against {rev!r}: git cannot show compare/optima.py there ({error.stderr.strip()})")
    source = source.replace("from .. import", "from kradapter import").replace("from ..", "from kradapter.")
    path = Path(tempfile.mkdtemp()) / f"optima_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    with_optimum = [registry.get(name, ["reference"]).optimum_of for name in registry.of_kind("reference")]
    parser.add_argument(
        "--method", choices=[name for name in with_optimum if name], default=registry.budget_method().name
    )
    parser.add_argument("--shape", type=_shape, default=(4096, 11008))
    parser.add_argument("--factorization", choices=["sqrt_min", "sqrt_max"], default="sqrt_max")
    parser.add_argument("--against", metavar="REV", help="a git revision whose solver runs beside this tree's")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    solvers = {"this tree": optima}
    if args.against:
        solvers[args.against] = _revision(args.against)
    rows_, cols = args.shape
    target = torch.randn(rows_, cols, generator=torch.Generator().manual_seed(args.seed))
    plan = plan_method(args.method, (rows_, cols), StudyConfig())
    layer = inject(plan, rows_, cols, 0, target.device, target.dtype).base_model.model.layer
    if isinstance(layer, LoKrLayer):
        _kronecker(solvers, target, plan, layer, args.rounds)
        return
    shape = KhatriRaoShape(rows_, cols, args.factorization)
    rows, mask = optima.kradapter_rows(target, shape)
    total = float((rows * rows).sum())
    print(f"{rows_}x{cols} {args.factorization}: r = {shape.r}, r2 = {shape.r2}, cropped = {mask is not None}")
    times: dict[str, list[float]] = {name: [] for name in solvers}
    for _ in range(args.rounds):
        for name, module in solvers.items():
            start = time.perf_counter()
            u, v, _, converged, bound = module.kradapter_factors(rows, mask)
            times[name].append(time.perf_counter() - start)
            fit = v.unsqueeze(2) * u.unsqueeze(1)
            error = float(((rows - (fit if mask is None else fit * mask)) ** 2).sum())
            print(
                f"  {name}: {times[name][-1]:.2f} s, squared error {error:.12e}, relative {(error / total) ** 0.5:.6f}"
                f", lower bound {(bound / total) ** 0.5:.6f}, converged {converged}",
                flush=True,
            )
    _report(times)


def _kronecker(solvers: dict[str, ModuleType], target: torch.Tensor, plan: Any, layer: Any, rounds: int) -> None:
    rows, cols = target.shape
    (first, second), ranks = optima.lokr_factors(layer)
    total = float((target.double() ** 2).sum())
    print(f"{rows}x{cols} LoKr {plan.settings}: w1 {first}, w2 {second}, ranks {ranks}")
    times: dict[str, list[float]] = {name: [] for name in solvers}
    for _ in range(rounds):
        for name, module in solvers.items():
            start = time.perf_counter()
            a, b, steps, converged, bound = module.nearest_kronecker(target, first, second, ranks)
            times[name].append(time.perf_counter() - start)
            error = float(((torch.kron(a, b) - target.double()) ** 2).sum())
            print(
                f"  {name}: {times[name][-1]:.2f} s, {steps} steps, squared error {error:.12e}, relative "
                f"{(error / total) ** 0.5:.8f}, lower bound {(bound / total) ** 0.5:.6f}, converged {converged}",
                flush=True,
            )
    _report(times)


def _report(times: dict[str, list[float]]) -> None:
    medians = {name: statistics.median(values) for name, values in times.items()}
    print("medians: " + ", ".join(f"{name} {value:.2f} s" for name, value in medians.items()))
    if len(medians) == 2:
        other = next(name for name in medians if name != "this tree")
        print(f"ratio {other} / this tree: {medians[other] / medians['this tree']:.2f}x")


if __name__ == "__main__":
    main()
