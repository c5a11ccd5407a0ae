"""What the Ray executor costs: whole-process wall time of N units, sequential vs a local Ray cluster.

    python benchmarks/executor_overhead.py [--units 20] [--work 0 0.5] [--workers 2] [--rounds 3]

Each run is a fresh process (imports, cluster start, units, shutdown: what a user waits for); rounds alternate
sequential and Ray; medians are printed and written to ``benchmarks/results/executor_overhead.json``. A unit is
an Adam least-squares fit at one torch thread sized to take about ``--work`` seconds (0: a trivial unit that
returns at once, which isolates the executor's own overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fit_unit(index: int, steps: int) -> dict:
    """An Adam least-squares fit of ``steps`` steps on a seeded 200x100 problem (module level: Ray imports it)."""
    if steps == 0:
        return {"index": index}
    import torch

    g = torch.Generator().manual_seed(index)
    a, b = torch.randn(200, 100, generator=g), torch.randn(200, 8, generator=g)
    x = torch.zeros(100, 8, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((a @ x - b) ** 2).mean()
        loss.backward()
        opt.step()
    return {"index": index, "loss": float(loss.detach())}


def child(executor: str, units: int, steps: int, workers: int) -> None:
    from kradapter.executor import RayExecutor, SequentialExecutor, Unit

    todo = [Unit(("u", i), fit_unit, (i, steps)) for i in range(units)]
    ex = SequentialExecutor(threads_per_unit=1) if executor == "sequential" else RayExecutor(workers=workers)
    start = time.perf_counter()
    with ex:
        started = time.perf_counter()
        summary = ex.run(todo, lambda k, r, a: None, progress=False)
    end = time.perf_counter()
    assert not summary.failed, summary.failed
    print(json.dumps({"start_s": started - start, "units_s": end - started}))


def steps_for(seconds: float) -> int:
    """Adam steps that take about ``seconds`` at one thread here (measured on 50 steps after a warm-up)."""
    if seconds <= 0:
        return 0
    import torch

    torch.set_num_threads(1)
    fit_unit(0, 5)  # first-call costs (autograd, optimiser imports) are not per-step costs
    t = time.perf_counter()
    fit_unit(0, 50)
    return max(1, round(50 * seconds / (time.perf_counter() - t)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, default=20)
    parser.add_argument("--work", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        executor, units, steps, workers = args.child
        child(executor, int(units), int(steps), int(workers))
        return
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    results = []
    for work in args.work:
        steps = steps_for(work)
        times: dict[str, list[dict]] = {"sequential": [], "ray": []}
        for r in range(args.rounds):
            for executor in ("sequential", "ray") if r % 2 == 0 else ("ray", "sequential"):
                sizes = [str(args.units), str(steps), str(args.workers)]
                command = [sys.executable, __file__, "--child", executor, *sizes]
                t = time.perf_counter()
                out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
                inner = json.loads(out.stdout.strip().splitlines()[-1])
                times[executor].append({"process_s": time.perf_counter() - t, **inner})
        row = {"work_s": work, "steps": steps, "units": args.units, "workers": args.workers}
        for executor, runs in times.items():
            for field in ("process_s", "start_s", "units_s"):
                row[f"{executor}_{field}"] = round(statistics.median(run[field] for run in runs), 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    from kradapter.store import write_json

    write_json(out_dir / "executor_overhead.json", {"cpu_count": os.cpu_count(), "rows": results}, indent=1)


if __name__ == "__main__":
    main()
