"""The optimum rows in the study: beside their methods, never worse than any fit, gaps in the document and table."""

from __future__ import annotations

from pathlib import Path

import torch

from kradapter.compare.config import StudyConfig, with_changes
from kradapter.compare.inputs import run_spec
from kradapter.compare.plots import summary_table
from kradapter.compare.results import SCHEMA_VERSION
from kradapter.compare.study import run_study
from kradapter.store import Store


def _run(tmp_path: Path, size: tuple[int, int], methods: list[str], factorization: str, seed: int) -> dict:  # type: ignore[type-arg]
    config = with_changes(
        StudyConfig(),
        matrices={"size": size, "types": ["random_noise", "low_rank"]},
        methods={"names": methods, "kradapter_factorization": factorization},
        training={"iterations": 150, "seeds": [seed]},
        output={"directory": str(tmp_path), "plots": False},
        runtime={"threads": 1},
    )
    with Store.open(config.output.directory, run_spec(config), "new", legacy=[config.output.results_file]) as store:
        results, failed = run_study(config, store, progress=False)
    assert failed == []
    return results


def test_optimum_rows_bound_every_fit(tmp_path: Path) -> None:
    seed = int(torch.randint(0, 10_000, ()).item())
    for i, (size, factorization) in enumerate([((40, 27), "sqrt_min"), ((23, 50), "sqrt_max")]):
        results = _run(tmp_path / str(i), size, ["lora", "kradapter", "kronecker"], factorization, seed)
        assert results["schema_version"] == SCHEMA_VERSION == 3
        for name, entry in results["results"].items():
            methods = entry["methods"]
            assert {"kradapter_optimum", "kronecker_optimum"} <= set(methods)
            assert "lora_optimum" not in methods
            for method in ("kradapter", "kronecker"):
                fit, best = methods[method], methods[f"{method}_optimum"]
                assert best["settings"] == fit["settings"] and best["params"] == fit["params"]
                # the optimum is never worse than the fit (7 significant digits stored)
                assert best["frobenius_error"] <= fit["frobenius_error"] * (1 + 1e-6), (name, method)
                assert fit["gap_to_optimum"] >= -1e-6 * fit["frobenius_error"]
                gap = fit["frobenius_error"] - best["frobenius_error"]
                assert abs(fit["gap_to_optimum"] - gap) <= 1e-6 * fit["frobenius_error"]
                assert abs(fit["relative_gap_to_optimum"] - gap / best["frobenius_error"]) <= 1e-5
                assert best["lower_bound_frobenius_error"] <= best["frobenius_error"] * (1 + 1e-6)
                assert isinstance(best["solver"], str) and best["exact"] in (True, False)
        table = summary_table(
            results,
            with_changes(
                StudyConfig(),
                methods={"names": ["lora", "kradapter", "kronecker"]},
                matrices={"types": ["random_noise", "low_rank"]},
            ),
        )
        assert "KRAdapter optimu" in table and "LoKr optimum" in table and "of opt." in table


def test_no_optimum_row_without_its_method(tmp_path: Path) -> None:
    results = _run(tmp_path, (20, 12), ["lora"], "sqrt_min", 1)
    for entry in results["results"].values():
        assert set(entry["methods"]) == {"lora", "svd", "zero"}
