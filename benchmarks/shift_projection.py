"""On paper: a shift study preset's wall time on 1, 8 and 64 nodes, from its units and their measured costs.

    python benchmarks/shift_projection.py [--preset powered] [--nodes 1 8 64] [--workers-per-node 2]
                                          [--measured runs/shift-ranks runs/shift-powered]

Not a measurement. The units are the preset's own (``kradapter shift --preset P``'s settings: cells, methods,
grids, seeds, reference rows), so the count is the one its progress bar shows. A unit's seconds are the study's
cost model (``StudySettings.estimate``: setup + optimiser steps + validation and evaluation texts scored, at the
unit times measured on this 2-core machine, ``shift_settings.UNIT_SECONDS``); summed over the units they are
``estimate()`` itself, which the script checks. ``--measured`` compares the model with the ``train_time_s`` of the
trainings already recorded in run folders (same model, same units) and prints the median ratio; ``--scale``
applies a factor to every unit (for example that ratio). Two units at once on a 2-core node run at one thread each,
each ``--one-thread`` times slower than the model's one process on 2 cores (measured 1.30: docs/executor.md,
"Threads").

The schedule is greedy (longest unit first onto the slot that frees first) within each of four waves, with a
barrier between waves: every method's grid trials (and the reference rows), each of the adaptive trials (each
waits for the one before: it needs its rate), then the seeds' runs; cluster start is added once. The runner
itself streams units (``Execution.stream``: a cell's next trial or its runs start as soon as their inputs are in,
with no barrier across cells), so this is an upper bound on its wall time, loosest on many nodes.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import statistics
from pathlib import Path

from kradapter.finetune import shift_cli
from kradapter.finetune.protocol import EXTRA_TRIALS, VAL_CHECKPOINTS, fit_steps
from kradapter.finetune.shift_settings import BASELINES, BENCHMARK_SHAPES, PRESETS, UNIT_SECONDS, StudySettings


def settings(preset: str) -> StudySettings:
    """The preset's settings, as ``kradapter shift --preset PRESET`` builds them."""
    return shift_cli.settings_from(shift_cli.build_parser().parse_args(["--preset", preset, "--out", "unused"]))


def training_seconds(s: StudySettings, benchmark: str, shots: int) -> float:
    """The model's seconds of one training in a cell: setup, its optimiser steps, its validation scorings."""
    shape, classes, _ = BENCHMARK_SHAPES[benchmark]
    unit = UNIT_SECONDS[shape]
    steps = s.recipe.steps or fit_steps(shots * classes, s.recipe.batch_size)
    val_texts = s.recipe.val_shots * classes * VAL_CHECKPOINTS
    return unit["setup"] + steps * unit["step"] + val_texts * unit["eval_text"]


def waves(s: StudySettings) -> list[list[float]]:
    """The units' model seconds in each of four waves (the runner's stages, with barriers added): grid trials and
    reference rows, each adaptive trial, the seeds' runs (a seed run also scores the evaluation sets; the linear
    probe embeds them once per seed)."""
    grid: list[float] = []
    adaptive: list[list[float]] = [[] for _ in range(EXTRA_TRIALS)]
    runs: list[float] = []
    for b in s.benchmarks:
        shape, classes, sets = BENCHMARK_SHAPES[b]
        eval_s = s.eval_per_class * classes * sets * UNIT_SECONDS[shape]["eval_text"]
        probe_s = (s.eval_per_class * classes * sets + s.recipe.val_shots * classes) * UNIT_SECONDS[shape]["eval_text"]
        for cell in s.cells(b):
            train = training_seconds(s, b, cell.shots)
            for m in cell.methods:
                trials = s.trials(m)
                grid += [train] * (trials - EXTRA_TRIALS if trials else 0)
                for wave in adaptive[: EXTRA_TRIALS if trials else 0]:
                    wave.append(train)
                runs += [train + eval_s] * len(s.seeds)
            for _ in s.seeds:  # the reference rows: majority (free) and the linear probe (the embeddings)
                grid += [probe_s] + [0.0] * (len(BASELINES) - 1)
    return [grid, *adaptive, runs]


def measured_ratios(s: StudySettings, folders: list[Path]) -> list[float]:
    """``train_time_s`` of each recorded training over the model's training seconds for its cell."""
    ratios = []
    for folder in folders:
        for line in (folder / "records.jsonl").read_text().splitlines():
            entry = json.loads(line)
            key, record = entry["key"], entry["record"]
            if record.get("train_time_s") and record.get("steps") and key[0] in BENCHMARK_SHAPES:
                shots = int(str(key[1]).split("_")[0][1:])
                ratios.append(record["train_time_s"] / training_seconds(s, key[0], shots))
    return ratios


def makespan(units: list[float], slots: int) -> float:
    """Longest-first greedy schedule of ``units`` on ``slots`` identical workers: the time the last one ends."""
    free = [0.0] * slots
    for t in sorted(units, reverse=True):
        heapq.heapreplace(free, free[0] + t)
    return max(free)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="powered")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--workers-per-node", type=int, default=2, help="units at once per node (2-core nodes, 1 thread)")
    p.add_argument("--one-thread", type=float, default=1.30, help="a unit's slowdown at 1 thread (measured 1.30)")
    p.add_argument("--scale", type=float, default=1.0, help="factor on every unit (e.g. the measured ratio)")
    p.add_argument("--start-s", type=float, default=55.0, help="cluster start and worker warm-up (measured)")
    p.add_argument("--measured", type=Path, nargs="*", default=[], help="run folders to check the model against")
    args = p.parse_args(argv)
    s = settings(args.preset)
    work = [[u * args.scale for u in wave] for wave in waves(s)]
    units, total = sum(len(w) for w in work), sum(map(sum, work))
    assert math.isclose(total, s.estimate() * args.scale, rel_tol=1e-9), (total, s.estimate())
    sizes = ", ".join(str(len(w)) for w in work)
    print(f"preset {args.preset}: {units} units, {total / 3600:.1f} h of unit time on one 2-core process "
          f"(= StudySettings.estimate() x {args.scale:g}); waves of {sizes} units")  # fmt: skip
    if args.measured:
        ratios = measured_ratios(s, args.measured)
        if ratios:
            q = statistics.quantiles(ratios, n=4)
            print(f"measured / model over {len(ratios)} recorded trainings: median {statistics.median(ratios):.2f} "
                  f"(quartiles {q[0]:.2f}, {q[2]:.2f})")  # fmt: skip
    print(f"{'nodes':>5} {'units at once':>13} {'wall time':>10}")
    one = sum(makespan(w, 1) for w in work)
    print(f"{1:>5} {1:>13} {one / 3600:8.1f} h   (one process, 2 threads: the model as measured)")
    for nodes in args.nodes:
        slots = nodes * args.workers_per_node
        slowdown = args.one_thread if args.workers_per_node > 1 else 1.0
        wall = sum(makespan([u * slowdown for u in w], slots) for w in work) + args.start_s
        print(f"{nodes:>5} {slots:>13} {wall / 3600:8.1f} h   ({wall / 60:,.0f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
