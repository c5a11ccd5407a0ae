"""What a report shows, read from a results folder of ``compare``, ``finetune`` or the shift study.

Each kind's JSON is brought to one shape, :class:`ReportData`: one row per run (method, seed, settings, its scores
and costs), the paired intervals (primary endpoints first), tables, per-layer effective ranks and spectra, and the
run's settings and provenance. Fields this module does not know are ignored, so results written by later versions
(extra rows, recorded learning rates, optimum rows) still make a report. Only the standard library and the
library's own statistics are used.
"""

from __future__ import annotations

import errno
import fcntl
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import registry
from ..records import RESULTS_FILES, ResultsError, read_results, results_file
from ..store import LOCK_FILE, RECORDS_FILE, RUN_FILE


class ReportError(ValueError):
    """A folder that cannot be reported on; the message names it."""


@dataclass
class ReportData:
    kind: str
    folder: str
    title: str
    primary: str  # the metric the Pareto fronts rank by
    higher_is_better: bool
    metrics: list[str]  # per-run metrics a chart can switch between, primary first
    costs: list[str]  # x axes of the Pareto front
    runs: list[dict[str, Any]] = field(default_factory=list)  # method, label, seed, settings, group, metrics, costs
    paired: list[dict[str, Any]] = field(default_factory=list)  # group, endpoint, against, mean, low, high, verdict, n
    tables: list[dict[str, Any]] = field(default_factory=list)  # title, columns, rows
    layers: list[dict[str, Any]] = field(default_factory=list)  # method, seed, group, index, layer, effective_rank
    spectra: list[dict[str, Any]] = field(default_factory=list)  # method, group, layer, index, value
    provenance: dict[str, Any] = field(default_factory=dict)
    running: str | None = None  # who holds the folder's lock, if a run is still writing it


def find_results(folder: Path) -> tuple[str, Path]:
    """The kind and results file of ``folder``, or a ReportError naming what is missing."""
    try:
        return results_file(folder)
    except ResultsError as exc:
        raise ReportError(str(exc)) from None


def lock_holder(folder: Path) -> str | None:
    """The holder's line if a run still holds the folder's lock (``store.FolderLock``), else None; takes no lock
    for longer than the probe and writes nothing."""
    path = folder / LOCK_FILE
    if not path.is_file():
        return None
    with path.open("r", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return handle.read().strip() or "another process"
            raise
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def load(folder: str | Path) -> ReportData:
    folder = Path(folder)
    try:
        kind, results = read_results(folder)  # the one reader of results documents (with the PEFT export)
    except ResultsError as exc:
        raise ReportError(str(exc)) from None
    path = folder / RESULTS_FILES[kind]
    run_meta: dict[str, Any] = {}
    if (folder / RUN_FILE).is_file():
        try:
            run_meta = json.loads((folder / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            run_meta = {"error": f"{RUN_FILE} could not be read"}
    build = {"compare": _compare, "finetune": _finetune, "shift": _shift}[kind]
    try:
        data = build(results, str(folder))
        if kind == "shift" and not data.layers:  # the current document leaves the per-layer rows in the records
            for (benchmark, cell, method), (seed, updates) in first_updates(folder / RECORDS_FILE).items():
                _updates(data, method, str(seed), f"{benchmark} {cell}", updates)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ReportError(f"{str(path)!r} is not a {kind} results file this version can read ({exc!r})") from None
    data.provenance = {
        "results file": path.name,
        "settings": run_meta.get("settings", results.get("settings", results.get("config"))),
        "inputs": run_meta.get("inputs"),
        "axes": run_meta.get("axes", results.get("axes")),
        "environment": results.get("environment"),
        "invocations": run_meta.get("invocations", results.get("invocations")),
    }
    data.running = lock_holder(folder)
    return data


def _label(name: str) -> str:
    from .. import registry

    try:
        return registry.label(name)
    except Exception:  # a method this version does not know (e.g. a reference row)
        return name


def _settings_text(settings: Any) -> str:
    if not isinstance(settings, dict) or not settings:
        return ""
    return ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))


def _paired(group: str, endpoint: str, against: str, pair: dict[str, Any]) -> dict[str, Any]:
    return {
        "group": group,
        "endpoint": endpoint,
        "against": _label(against),
        "row": f"{group} · {endpoint} · vs {_label(against)}",
        "mean": float(pair["mean_difference"]),
        "low": float(pair["low"]),
        "high": float(pair["high"]),
        "verdict": pair.get("verdict", ""),
        "outcome": str(pair.get("verdict", "")).split(" (")[0],  # "not detected (MDE 1.3 points)": its word
        "n": int(pair.get("n", 0)),
    }


def _pair_runs(group: str, endpoint: str, by_method: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """KRAdapter minus each other method over the seeds both have: the paired t interval, whose 95% holds at the
    handful of seeds these runs have, where the percentile bootstrap's does not (``kradapter.stats``)."""
    from ..stats import paired_t_interval, verdict

    out: list[dict[str, Any]] = []
    anchor = registry.anchor()  # the method every paired interval is against
    ref = by_method.get(anchor)
    if not ref:
        return out
    for other, scores in sorted(by_method.items()):
        common = [s for s in scores if s in ref]
        if other == anchor or len(common) < 2:
            continue
        t = paired_t_interval([ref[s] for s in common], [scores[s] for s in common])
        pair = {
            "mean_difference": t.estimate,
            "low": t.low,
            "high": t.high,
            "n": t.n,
            "verdict": verdict(t.low, t.high),
        }
        out.append(_paired(group, endpoint, other, pair))
    return out


# -- compare ----------------------------------------------------------------------------------------------------------

COMPARE_METRICS = [
    "relative_frobenius_error",
    "nuclear_error",
    "frobenius_error",
    "effective_rank",
    "spectral_energy_ratio",
]


def _compare(results: dict[str, Any], folder: str) -> ReportData:
    data = ReportData(
        kind="compare",
        folder=folder,
        title="kradapter compare: matrix approximation at an equal parameter budget",
        primary="relative_frobenius_error",
        higher_is_better=False,
        metrics=COMPARE_METRICS,
        costs=["seconds", "params"],
    )
    rows: list[str] = []
    for matrix, entry in results["results"].items():
        label = entry.get("label", matrix)
        target = entry.get("target") or {}
        for i, value in enumerate(target.get("singular_values") or []):
            data.spectra.append({"method": "target", "group": label, "layer": label, "index": i + 1, "value": value})
        by_method: dict[str, dict[str, float]] = {}
        table_rows = []
        for method, result in (entry.get("methods") or {}).items():
            if not isinstance(result, dict) or result.get("error"):
                continue
            for seed, run in (result.get("runs") or {}).items():
                if not isinstance(run, dict) or run.get("error"):
                    continue
                data.runs.append(
                    {
                        "method": _label(method),
                        "seed": str(seed),
                        "settings": _settings_text(run.get("settings")) or f"rank {result.get('rank')}",
                        "group": label,
                        "metrics": {m: run.get(m) for m in COMPARE_METRICS},
                        "costs": {"seconds": run.get("seconds"), "params": run.get("params")},
                    }
                )
                if run.get("relative_frobenius_error") is not None:
                    by_method.setdefault(method, {})[str(seed)] = float(run["relative_frobenius_error"])
            for i, value in enumerate(result.get("singular_values") or []):
                data.spectra.append(
                    {"method": _label(method), "group": label, "layer": label, "index": i + 1, "value": value}
                )
            data.layers.append(
                {
                    "method": _label(method),
                    "seed": "mean",
                    "group": "all matrices",
                    "index": len(rows),
                    "layer": label,
                    "effective_rank": result.get("effective_rank"),
                }
            )
            table_rows.append(
                [
                    _label(method),
                    result.get("params"),
                    result.get("relative_frobenius_error"),
                    result.get("nuclear_error"),
                    result.get("effective_rank"),
                    result.get("seeds"),
                ]
            )
        rows.append(label)
        data.paired += _pair_runs(label, "relative Frobenius error", by_method)
        data.tables.append(
            {
                "title": f"{label} ({entry.get('source', '')}; target effective rank {target.get('effective_rank')})",
                "columns": ["method", "params", "rel. Frobenius error", "nuclear error", "effective rank", "seeds"],
                "rows": table_rows,
            }
        )
    return data


# -- finetune ---------------------------------------------------------------------------------------------------------


def _updates(data: ReportData, method: str, seed: str, group: str, updates: Any) -> None:
    for index, row in enumerate(updates or []):
        if not isinstance(row, dict):
            continue
        layer = str(row.get("layer", index)).removeprefix("base_model.model.")
        data.layers.append(
            {
                "method": _label(method),
                "seed": seed,
                "group": group,
                "index": index,
                "layer": layer,
                "effective_rank": row.get("effective_rank"),
            }
        )
        for i, value in enumerate(row.get("singular_values") or []):  # one seed per method: its first
            data.spectra.append(
                {"method": _label(method), "group": group, "layer": layer, "index": i + 1, "value": value}
            )


def _finetune(results: dict[str, Any], folder: str) -> ReportData:
    data = ReportData(
        kind="finetune",
        folder=folder,
        title="kradapter finetune: fine-tuning at an equal parameter budget",
        primary="accuracy",
        higher_is_better=True,
        metrics=["accuracy", "macro_f1", "loss"],
        costs=["train_time_s", "peak_memory_mb", "trainable_params"],
    )
    group = f"{(results.get('model') or {}).get('name', 'model')}, k={(results.get('settings') or {}).get('shots')}"
    scores: dict[str, dict[str, dict[str, float]]] = {"accuracy": {}, "macro_f1": {}}
    first_seed: dict[str, str] = {}
    for method, runs in results["runs"].items():
        for seed, run in sorted(runs.items(), key=lambda kv: str(kv[0])):
            if not isinstance(run, dict) or "test" not in run:
                continue
            test = run["test"]
            knobs = ((results.get("methods") or {}).get(method) or {}).get("knobs")
            data.runs.append(
                {
                    "method": _label(method),
                    "seed": str(seed),
                    "settings": ", ".join(x for x in (_settings_text(knobs), f"lr={run.get('lr')}") if x),
                    "group": group,
                    "metrics": {m: test.get(m) for m in data.metrics},
                    "costs": {c: run.get(c) for c in data.costs},
                }
            )
            for m in scores:
                if test.get(m) is not None:
                    scores[m].setdefault(method, {})[str(seed)] = float(test[m])
            if method not in first_seed:
                first_seed[method] = str(seed)
                _updates(data, method, str(seed), group, run.get("updates"))
    stored = results.get("paired")
    if isinstance(stored, dict) and stored:
        for endpoint, by_other in stored.items():
            for other, pair in (by_other or {}).items():
                data.paired.append(_paired(group, endpoint, other, pair))
    else:
        for m in scores:
            data.paired += _pair_runs(group, m, scores[m])
    columns = ["method", "settings", "trainable", "accuracy", "macro F1", "train s", "peak MB", "seeds"]
    rows = []
    for method, s in (results.get("summary") or {}).items():
        if not isinstance(s, dict):
            continue
        rows.append(
            [
                _label(method),
                _settings_text(s.get("knobs")) + f" lr={s.get('lr')}",
                s.get("trainable_params"),
                _pm(s.get("accuracy_mean"), s.get("accuracy_std")),
                _pm(s.get("macro_f1_mean"), s.get("macro_f1_std")),
                s.get("train_time_s_mean"),
                s.get("peak_memory_mb_max"),
                len(s.get("seeds") or []),
            ]
        )
    data.tables.append({"title": f"BBC News test set ({group})", "columns": columns, "rows": rows})
    return data


def _pm(mean: Any, std: Any) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


# -- shift ------------------------------------------------------------------------------------------------------------

PRIMARY_ENDPOINTS = ("id", "ood", "gap")


def _shift(results: dict[str, Any], folder: str) -> ReportData:
    data = ReportData(
        kind="shift",
        folder=folder,
        title="kradapter shift: in and out of distribution",
        primary="ood" if "primary" in results else "id",
        higher_is_better=True,
        metrics=["ood", "id", "gap"] if "primary" in results else ["id", "ood", "gap"],
        costs=["train_time_s", "peak_memory_mb", "trainable_params"],
    )
    for benchmark, bench in results["benchmarks"].items():
        domains = list(bench.get("domains") or [])
        data.metrics += [d for d in domains if d not in data.metrics]
        for cell_id, cell in (bench.get("cells") or {}).items():
            group = f"{benchmark} {cell_id}"
            methods = cell.get("methods") or {}
            for method, by_seed in (cell.get("runs") or {}).items():
                for n, (seed, run) in enumerate(sorted(by_seed.items(), key=lambda kv: str(kv[0]))):
                    if not isinstance(run, dict) or "scores" not in run:
                        continue
                    entry = methods.get(method) or {}
                    data.runs.append(
                        {
                            "method": _label(method),
                            "seed": str(seed),
                            "settings": ", ".join(
                                x for x in (entry.get("describe") or "", f"lr={run.get('lr', entry.get('lr'))}") if x
                            ),
                            "group": group,
                            "metrics": dict(run["scores"]),
                            "costs": {c: run.get(c) for c in data.costs},
                        }
                    )
                    if n == 0:
                        _updates(data, method, str(seed), group, run.get("updates"))
            if "primary" not in results:  # the earlier study's document: intervals and summaries per cell
                _shift_cell_v1(data, group, benchmark, cell_id, cell, domains)
    if "primary" in results:
        _shift_v2(data, results)
    return data


def first_updates(path: Path) -> dict[tuple[str, str, str], tuple[int, list[Any]]]:
    """Per (benchmark, cell, method) its lowest seed's learned-update rows, from a shift run's records (read as they
    stand: a line still being appended is skipped). Only the keys are parsed until the chosen lines are known."""
    chosen: dict[tuple[str, str, str], tuple[int, bytes]] = {}
    if not path.is_file():
        return {}
    with path.open("rb") as lines:
        for line in lines:
            if not line.endswith(b"\n"):
                break
            head, found, _ = line.partition(b',"record":')
            try:
                key = json.loads(head.removeprefix(b'{"key":')) if found else None
            except ValueError:
                continue
            if not (isinstance(key, list) and len(key) == 5 and key[2] == "run" and isinstance(key[4], int)):
                continue
            where = (str(key[0]), str(key[1]), str(key[3]))
            if b'"updates":' in line and (where not in chosen or key[4] < chosen[where][0]):
                chosen[where] = (key[4], line)
    out = {}
    for where, (seed, line) in chosen.items():
        try:
            updates = json.loads(line)["record"].get("updates")
        except (ValueError, KeyError, AttributeError):  # a damaged line: no layer rows from it
            continue
        if isinstance(updates, list):
            out[where] = (seed, updates)
    return out


def _shift_cell_v1(
    data: ReportData, group: str, benchmark: str, cell_id: str, cell: dict[str, Any], domains: list[str]
) -> None:
    paired = cell.get("paired") or {}
    order = [m for m in PRIMARY_ENDPOINTS if m in paired] + [m for m in paired if m not in PRIMARY_ENDPOINTS]
    for endpoint in order:
        for other, pair in (paired[endpoint] or {}).items():
            data.paired.append(_paired(group, endpoint, other, pair))
    metrics = ["id", *domains, "ood", "gap"]
    rows = []
    for method, s in (cell.get("summary") or {}).items():
        rows.append(
            [_label(method)] + [_pm((s.get(m) or {}).get("mean"), (s.get(m) or {}).get("std")) for m in metrics]
        )
    data.tables.append(
        {"title": f"{benchmark}, cell {cell_id}: accuracy per domain", "columns": ["method", *metrics], "rows": rows}
    )


def _interval_row(e: dict[str, Any]) -> dict[str, Any] | None:
    """A tested paired entry of the study's document as the forest draws it (points: KRAdapter minus the other)."""
    t = e.get("t")
    if not t:
        return None
    return {"mean_difference": e["mean"], "low": t["low"], "high": t["high"], "n": e["n"], "verdict": e["verdict"]}


def _shift_v2(data: ReportData, results: dict[str, Any]) -> None:
    """The current document: the pre-registered primary endpoints first (their table, then their intervals), the
    exploratory contrasts, and every cell's table of methods and baselines (numbers formatted as the study's own
    markdown tables format them)."""
    from ..finetune.shift_report import _interval, _num, _p

    primary = results["primary"]
    reference = _label(registry.reference_adapter())
    family = primary.get("family") or {}
    pending = f", {family['pending']} pending (interim)" if family.get("pending") else ""
    rows = []
    for e in primary["endpoints"]:
        t = e.get("t") or {}
        rows.append([
            f"{e['benchmark']}, {e['shots']} shots", str(e["n"]), _num(e.get("mean"), sign=True), _num(e.get("sd")),
            _interval(t["low"], t["high"]) if t else "-", _p(t.get("p")), _p((e.get("sign_flip") or {}).get("p")),
            _p(e.get("holm_p")), _num(e.get("mde")), e["verdict"],
        ])  # fmt: skip
        pair = _interval_row(e)
        if pair is not None:
            data.paired.append(_paired(e["name"], "ood (primary)", registry.reference_adapter(), pair))
    data.tables.append({
        "title": f"Primary endpoints (pre-registered): KRAdapter minus {reference}, mean OOD accuracy, points; Holm "
        f"over the family of {family.get('size', len(rows))}{pending}",
        "columns": ["endpoint", "n", "mean", "SD", "95% t interval", "t p", "sign-flip p", "Holm p", "MDE", "verdict"],
        "rows": rows,
    })  # fmt: skip
    for metric, entries in (results.get("exploratory") or {}).get("contrasts", {}).items():
        for e in entries:
            pair = _interval_row(e)
            if pair is not None:
                data.paired.append(_paired(e["unit"], f"{metric} (exploratory)", e["against"], pair))
    for table in (results.get("tables") or {}).values():
        domains = list(table.get("domains") or [])
        metrics = ["id", *domains, "ood", "gap"]
        rows = []
        for method, row in (table.get("rows") or {}).items():
            cells = [_pm((row.get(m) or {}).get("mean"), (row.get(m) or {}).get("std")) for m in metrics]
            flagged = ", ".join(map(str, row.get("flagged_seeds") or [])) or ("none" if "fit" in row else "-")
            rows.append([_label(method), str(row.get("n", "")), *cells, flagged])
        data.tables.append({
            "title": f"{table['benchmark']}, {table['shots']} shots per class, {table['budget']}x KRAdapter's count: "
            "accuracy per domain (exploratory)",
            "columns": ["method", "seeds", *metrics, "seeds flagged (underfit / diverged)"],
            "rows": rows,
        })  # fmt: skip
