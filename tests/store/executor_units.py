"""Module-level units for the executor tests (workers import them by reference, as they would a study's)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from kradapter.executor import UnitResult


def lstsq_unit(seed: int, m: int, n: int, steps: int = 50) -> dict:
    """A seeded least-squares fit by gradient descent (Adam); every float as its bit pattern.

    No direct solve: MKL's LAPACK ``gelsy`` behind ``torch.linalg.lstsq`` gives different last bits from call to
    call in one process (measured), so it cannot be a bit-identity reference.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=g)
    b = torch.randn(m, 3, generator=g)
    x = torch.zeros(n, 3, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((a @ x - b) ** 2).mean()
        loss.backward()
        opt.step()
    return {
        "loss": float(loss.detach()),
        "x_hex": x.detach().numpy().tobytes().hex(),
        "threads": torch.get_num_threads(),
    }


def sleep_unit(name: str, seconds: float) -> dict:
    time.sleep(seconds)
    return {"name": name, "finished_at": time.time(), "pid": os.getpid()}


def crash_unit(counter: str) -> dict:
    """Count the attempt in ``counter``, then die the way an OOM kill or a lost node does: SIGKILL."""
    with Path(counter).open("a") as f:
        f.write(f"{os.getpid()}\n")
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    return {}  # pragma: no cover


def failing_unit(counter: str) -> dict:
    with Path(counter).open("a") as f:
        f.write(f"{os.getpid()}\n")
    raise ValueError("bad value 7\nsecond line of detail")


def artifact_unit(seed: int) -> UnitResult:
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(5, 3, generator=g)
    return UnitResult(
        {"seed": seed, "norm": float(weights.norm())},
        {f"adapters/s{seed}/weights.bin": weights.numpy().tobytes(), f"adapters/s{seed}/config.json": b"{}"},
    )


def threads_unit() -> dict:
    """The unit's torch threads, its OpenMP variable, and the thread count of every native pool (numpy's BLAS)."""
    import numpy  # noqa: F401  (its BLAS loaded, as in any unit that uses numpy)
    from threadpoolctl import threadpool_info

    pools = sorted({info["internal_api"]: info["num_threads"] for info in threadpool_info()}.items())
    return {"torch": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"), "pools": pools}


def inputs_probe(digest: str) -> dict[str, str]:
    """What a worker finds for its inputs (the test decides, standing in for hashing model/data files)."""
    return {"data": digest}


def environ_unit() -> dict[str, str]:
    return dict(os.environ)
