"""On paper: the powered shift study's wall time on 1, 8 and 64 nodes, from the published units' training times.

    python benchmarks/shift_projection.py [--nodes 1 8 64] [--workers-per-node 2] [--seeds 20] [--overhead 1.6]

Not a measurement. The unit times are the published shift study's ``train_time_s`` (docs/data/shift_results.json,
this 2-core machine), medians per (benchmark, shots); the assumptions (docs/executor.md, "Projections") are the
arguments of this script and are printed with the result. The schedule is greedy (longest unit first onto the
slot that frees first) within each tuning phase, with a barrier between phases: the grid's trials, each of the two
adaptive trials (each waits for the one before), then the seeds' runs; a real run overlaps phases of different
cells, so these figures are upper bounds for the assumed unit times.
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEWSGROUPS = ("ng_comp_rec", "ng_comp_sci", "ng_comp_talk", "ng_rec_sci", "ng_rec_talk", "ng_sci_talk")
BENCHMARKS = ("sentiment", "topic", *NEWSGROUPS)
SHOTS = (8, 32, 128)
ANCHOR = 32
EVERY_CELL = 2  # methods in every cell: the primary pair (the published study's first two methods)
ANCHOR_ONLY = 5  # contenders in the anchor cell only: the published study's other methods but one
GRID, ADAPTIVE = 5, 2  # tuning trials per method and cell (ROUND contract: >= 5 log-spaced rates + 2 adaptive)


def published_times(path: Path) -> dict[tuple[str, int], float]:
    """Median ``train_time_s`` per (benchmark, shots) in the published results."""
    data = json.loads(path.read_text())
    times: dict[tuple[str, int], list[float]] = {}
    for bench, entry in data["benchmarks"].items():
        for cell in entry["cells"].values():
            for runs in cell.get("runs", {}).values():
                for run in runs.values():
                    times.setdefault((bench, cell["shots"]), []).append(run["train_time_s"])
    return {k: statistics.median(v) for k, v in times.items()}


def unit_times(published: dict[tuple[str, int], float]) -> dict[tuple[str, int], float]:
    """Training seconds per (benchmark, shots) for every benchmark of the powered study.

    Sentiment (2 classes) is published at 8/32/128 shots; topic (4 classes) only at 32: its other shots scale
    like sentiment's. A newsgroups task (2 classes, long posts cut at the same token limit) is assumed to cost
    per example what topic does: topic's time halved (half the classes, so half the examples).
    """
    s = {k: published[("sentiment", k)] for k in SHOTS}
    topic = {k: published[("topic", ANCHOR)] * s[k] / s[ANCHOR] for k in SHOTS}
    out = {("sentiment", k): s[k] for k in SHOTS} | {("topic", k): topic[k] for k in SHOTS}
    out |= {(ng, k): topic[k] / 2 for ng in NEWSGROUPS for k in SHOTS}
    return out


def phases(times: dict[tuple[str, int], float], seeds: int, overhead: float) -> list[list[float]]:
    """The units' wall seconds in each phase: grid trials, adaptive trial 1, adaptive trial 2, seed runs."""
    cells = [(b, k) for b in BENCHMARKS for k in SHOTS for _ in range(EVERY_CELL)]
    cells += [(b, ANCHOR) for b in BENCHMARKS for _ in range(ANCHOR_ONLY)]
    cost = [times[(b, k)] * overhead for b, k in cells]
    return [[c for c in cost for _ in range(GRID)], cost, cost, [c for c in cost for _ in range(seeds)]]


def makespan(units: list[float], slots: int) -> float:
    """Longest-first greedy schedule of ``units`` on ``slots`` identical workers: the time the last one ends."""
    free = [0.0] * slots
    for t in sorted(units, reverse=True):
        heapq.heapreplace(free, free[0] + t)
    return max(free)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--workers-per-node", type=int, default=2, help="units at once per node (2-core nodes, 1 thread)")
    p.add_argument("--seeds", type=int, default=20, help="seeds per method and cell (protocol-generalisation.md)")
    p.add_argument("--overhead", type=float, default=1.6, help="unit wall time / its train_time_s (see docs)")
    p.add_argument("--start-s", type=float, default=55.0, help="cluster start and worker warm-up (measured)")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "data" / "shift_results.json")
    args = p.parse_args(argv)
    times = unit_times(published_times(args.results))
    work = phases(times, args.seeds, args.overhead)
    total_units, total_s = sum(len(w) for w in work), sum(map(sum, work))
    print(f"{total_units} units, {total_s / 3600:.1f} h of unit time (overhead x{args.overhead}, {args.seeds} seeds)")
    print(
        "unit seconds (train_time_s, before overhead): "
        + ", ".join(f"{b} {k}: {t:.1f}" for (b, k), t in times.items() if b in ("sentiment", "topic", "ng_comp_rec"))
    )
    for nodes in args.nodes:
        slots = nodes * args.workers_per_node
        wall = sum(makespan(w, slots) for w in work) + (args.start_s if nodes > 1 or slots > 1 else 0.0)
        print(f"{nodes:>3} node(s), {slots:>3} units at once: {wall / 3600:6.2f} h ({wall / 60:7.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
