"""Whole-process wall time of command variants, alternated round by round, medians: what a user waits for.

    python benchmarks/whole_process.py --rounds 3 --out timings.json \\
        --variant "1 thread=kradapter compare --threads 1 --out {tmp}/a --overwrite" \\
        --variant "2 threads=kradapter compare --threads 2 --out {tmp}/b --overwrite"

Each run is a fresh process (start-up, imports, work, files). ``{tmp}`` is a scratch folder made for the run
(deleted after). Rounds alternate the variants in a rotating order, so a change in the machine's load hits every
variant alike; the 1-minute load average is read before and after each run (the machine is shared). The JSON holds
every run and the medians; the lines printed are the table BENCHMARKS.md quotes.

``--busy N`` keeps N other processes spinning on the CPU for the whole measurement (started before the first run,
stopped after the last): a shared machine, made reproducible, for the "busy" rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

SPIN = "while True: pass"


def load() -> float:
    return os.getloadavg()[0]


def run_once(command: str, timeout: float | None) -> dict:
    """One fresh process; past ``timeout`` it is killed and its time is a lower bound (``"killed": true``)."""
    with tempfile.TemporaryDirectory(prefix="whole-process-") as tmp:
        argv = shlex.split(command.replace("{tmp}", tmp))
        before = load()
        start = time.perf_counter()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            rc, out, err, killed = proc.returncode, proc.stdout, proc.stderr, False
        except subprocess.TimeoutExpired as exc:
            rc, killed = -9, True
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = ""
        seconds = time.perf_counter() - start
        return {
            "seconds": round(seconds, 3),
            "rc": rc,
            "killed": killed,
            "load_before": before,
            "load_after": load(),
            "stderr_tail": err[-300:] if rc else "",
            "stdout_tail": out[-400:],
        }


@contextmanager
def busy(processes: int):
    """``processes`` pure-Python spinners (one core each when they get it), for the duration of the block."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(processes)]
    try:
        time.sleep(2.0 if spinners else 0.0)  # let the load settle before the first run
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, metavar="LABEL=COMMAND")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=None, help="kill a run after this many seconds (a lower bound)")
    p.add_argument("--busy", type=int, default=0, metavar="N", help="N spinning processes beside every run")
    args = p.parse_args(argv)
    if args.busy < 0:
        p.error(f"--busy: expected a whole number >= 0, got {args.busy}")
    variants = dict(v.split("=", 1) for v in args.variant)
    labels = list(variants)
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with busy(args.busy):
        for r in range(args.rounds):
            order = labels[r % len(labels) :] + labels[: r % len(labels)]
            for label in order:
                result = run_once(variants[label], args.timeout)
                runs[label].append(result)
                print(
                    f"round {r + 1} {label}: {result['seconds']:.1f} s rc {result['rc']} "
                    f"load {result['load_before']:.2f}->{result['load_after']:.2f}",
                    flush=True,
                )
                partial = {"started": started, "busy": args.busy, "variants": variants, "runs": runs}
                args.out.write_text(json.dumps(partial, indent=1))
    medians = {label: statistics.median(x["seconds"] for x in runs[label]) for label in labels}
    loads = [x[k] for label in labels for x in runs[label] for k in ("load_before", "load_after")]
    payload = {
        "started": started,
        "busy": args.busy,
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "variants": variants,
        "runs": runs,
        "median_s": medians,
        "load_min": min(loads),
        "load_max": max(loads),
    }
    args.out.write_text(json.dumps(payload, indent=1))
    for label in labels:
        times = ", ".join(f"{'>' if x['killed'] else ''}{x['seconds']:.1f}" for x in runs[label])
        print(f"{label}: median {medians[label]:.1f} s ({times})")
    print(f"load average (1 min) {min(loads):.2f} to {max(loads):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
