"""Helpers shared by the test areas (fixtures stay in ``conftest.py``): tiny models built from configs, a skip that
names a missing package, child processes with this checkout's source first on the path, a runner of forked
commands, and holders of a results folder's lock.

Imported as ``from tests import support`` (pytest puts the repository root on the path: ``tests`` is a package).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import select
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
EXAMPLES = ROOT / "examples"

# Odd shapes: square, tall, wide, primes, larger side not a product r*r2.
ODD_SHAPES = [(1, 1), (1, 7), (7, 1), (5, 5), (13, 29), (29, 13), (72, 130), (130, 72), (97, 389), (64, 100)]


def reference_delta(u: Any, v: Any, out_features: int, in_features: int) -> Any:
    """KRAdapter's update from numpy factors, independently of the package: row ``i`` is ``kron(V[i], U[i])``,
    cropped to ``max(d, k)``, with the ``m`` side along the smaller dimension."""
    import numpy as np

    big = max(out_features, in_features)
    rows = np.stack([np.kron(v[i], u[i])[:big] for i in range(u.shape[0])])
    return rows.T if out_features > in_features else rows


# -- optional packages --------------------------------------------------------------------------------------------


def installed(distribution: str) -> bool:
    """Whether ``distribution`` is installed (looked up by its metadata, never imported: data packages are files)."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def requires(*packages: str | tuple[str, str]) -> pytest.MarkDecorator:
    """A skip mark for a test that needs installed packages, each a distribution name or ``(name, install line)``;
    the skip reason names each missing one and how to install it (default ``pip install NAME``)."""
    missing = []
    for package in packages:
        name, pip = package if isinstance(package, tuple) else (package, f"pip install {package}")
        if not installed(name):
            missing.append(f"package {name} is not installed ({pip})")
    return pytest.mark.skipif(bool(missing), reason="; ".join(missing))


# -- tiny models built from configs (no download) ---------------------------------------------------------------


def tiny_bert_config(**overrides: Any) -> Any:
    """A 2-layer BERT with odd sizes (hidden 30, MLP 37); ``overrides`` replace any field."""
    from transformers import BertConfig

    fields = {
        "vocab_size": 97,
        "hidden_size": 30,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "max_position_embeddings": 32,
    }
    return BertConfig(**(fields | overrides))


def tiny_gpt2_config(**overrides: Any) -> Any:
    """A 1-layer GPT-2 (transformers ``Conv1D`` layers, weight stored as (in, out)), embedding 12."""
    from transformers import GPT2Config

    fields = {"vocab_size": 50, "n_positions": 16, "n_embd": 12, "n_layer": 1, "n_head": 2}
    return GPT2Config(**(fields | overrides))


def tiny_gpt2(seed: int | None = None, **overrides: Any) -> Any:
    """A ``GPT2Model`` of :func:`tiny_gpt2_config` (seeded with ``seed`` when given), in eval mode."""
    import torch
    from transformers import GPT2Model

    if seed is not None:
        torch.manual_seed(seed)
    return GPT2Model(tiny_gpt2_config(**overrides)).eval()


def tiny_llama_config(**overrides: Any) -> Any:
    """Two layers, hidden 24, MLP 37 (odd), grouped-query attention (4 heads, 2 key/value heads)."""
    from transformers import LlamaConfig

    fields = {
        "vocab_size": 67,
        "hidden_size": 24,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return LlamaConfig(**(fields | overrides))


def tiny_llama(seed: int = 0, dtype: Any = None, **overrides: Any) -> Any:
    """A ``LlamaForCausalLM`` of :func:`tiny_llama_config`, seeded, in ``dtype`` (default float32), in eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype or torch.float32).eval()


# -- child processes ----------------------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: offline, one thread, unbuffered, this checkout's ``src`` first on the
    path, then its root (a test file run as a script, e.g. by ``torchrun``, imports ``tests.support``)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), str(ROOT), env.get("PYTHONPATH")]))
    return env | extra


def run_python(*args: str | Path, timeout: float = 300, env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """``python ARGS`` in a fresh interpreter (this one's), output captured as text; never raises on exit codes."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=env or child_env(),
        timeout=timeout,
        check=False,
        **kwargs,
    )


def run_cli(*argv: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``kradapter ARGV`` in a fresh interpreter, as the console script runs it."""
    return run_python("-m", "kradapter.cli", *argv, timeout=timeout)  # type: ignore[no-any-return]


def snapshot(directory: Path, skip: tuple[str, ...] = (".lock",)) -> dict[str, bytes]:
    """Every file's bytes under ``directory`` by relative name (the lock file aside: it names the last holder)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in skip
    }


FORK_SERVER = textwrap.dedent(
    """
    import json, os, sys
    import numpy, peft, torch, transformers  # the slow imports, once; each run is a fork of this process
    import kradapter.compare.study, kradapter.compare.fit, kradapter.records
    from kradapter.cli import main

    print("ready", flush=True)
    for line in sys.stdin:
        runs = json.loads(line)
        pids = []
        for argv, log in runs:
            pid = os.fork()
            if pid == 0:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                try:
                    code = main(argv)
                except SystemExit as exc:
                    code = exc.code
                except BaseException:
                    import traceback
                    traceback.print_exc()
                    code = 99
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(int(code or 0))
            pids.append(pid)
        print(json.dumps(pids), flush=True)
        print(json.dumps([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]), flush=True)
    """
)


class ForkRunner:
    """Runs ``kradapter`` commands in child processes forked from one interpreter that has imported torch, PEFT and
    transformers already (each fresh process would spend most of a short test's time importing them)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.count = 0
        self.server = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        assert self.read() == "ready"

    def read(self, timeout: float = 300) -> str:
        assert self.server.stdout is not None
        ready, _, _ = select.select([self.server.stdout], [], [], timeout)
        assert ready, "the runner did not answer"
        return self.server.stdout.readline().strip()

    def start(self, *argvs: list[str | Path]) -> tuple[list[int], list[Path]]:
        """Start one child per ``kradapter`` argument list at once; returns their pids and log files."""
        assert self.server.stdin is not None
        logs = []
        for _ in argvs:
            self.count += 1
            logs.append(self.log_dir / f"run{self.count}.log")
        runs = [[list(map(str, argv)), str(log)] for argv, log in zip(argvs, logs, strict=True)]
        self.server.stdin.write(json.dumps(runs) + "\n")
        self.server.stdin.flush()
        return json.loads(self.read()), logs

    def exited(self, timeout: float) -> list[int] | None:
        """The children's exit codes (negative: killed by that signal) once all ended, or None after ``timeout``."""
        assert self.server.stdout is not None
        ready, _, _ = select.select([self.server.stdout], [], [], timeout)
        return json.loads(self.server.stdout.readline()) if ready else None

    def close(self) -> None:
        assert self.server.stdin is not None
        self.server.stdin.close()
        self.server.wait(timeout=60)


# -- holders of a results folder's lock ---------------------------------------------------------------------------

# A process that opens a results store (``Store.open(folder, spec, mode)``), says "locked", and closes it when a
# line arrives on stdin.
STORE_HOLDER = textwrap.dedent(
    """
    import sys, time
    from kradapter.store import RunSpec, Store
    store = Store.open(sys.argv[1], RunSpec("compare", {"x": 1}), sys.argv[2])
    print("locked", flush=True)
    sys.stdin.readline()
    store.close()
    """
)

# A process that holds the folder's flock with the lock file still empty (the moments just after a run locks and
# just before it unlocks), then, told on stdin, writes its name, or unlocks.
BARE_HOLDER = textwrap.dedent(
    """
    import fcntl, sys
    handle = open(sys.argv[1], "a+")
    fcntl.flock(handle, fcntl.LOCK_EX)
    print("locked", flush=True)
    if sys.stdin.readline().strip() == "name":
        handle.write("pid 4242 on elsewhere, started then: compare\\n")
        handle.flush()
    else:
        fcntl.flock(handle, fcntl.LOCK_UN)
    print("done", flush=True)
    sys.stdin.readline()
    """
)


def start_holder(script: str, *args: str | Path) -> subprocess.Popen[str]:
    """Start a lock holder (:data:`STORE_HOLDER` or :data:`BARE_HOLDER`) and wait until it holds the lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


@contextmanager
def store_held(folder: Path, mode: str = "new") -> Iterator[subprocess.Popen[str]]:
    """``folder``'s store open in another process for the ``with`` block; closed cleanly (exit 0) after it."""
    holder = start_holder(STORE_HOLDER, folder, mode)
    try:
        yield holder
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0


def listed_before_written(monkeypatch: pytest.MonkeyPatch, out: Path) -> list[str]:
    """Check, whenever a path appears in the run folder ``out`` under its final name (a rename over it, or a new
    folder), that run.json on disk already lists it or a folder holding it (the store's write-ahead listing);
    returns the paths seen, filled in as the run goes."""
    from kradapter.store import LOCK_FILE, RECORDS_FILE, RUN_FILE

    seen: list[str] = []
    root = out.absolute()

    def check(destination: object) -> None:
        path = Path(str(destination)).absolute()
        if root not in path.parents or not (out / RUN_FILE).exists():
            return
        relative = path.relative_to(root).as_posix()
        if relative in (RUN_FILE, RECORDS_FILE, LOCK_FILE) or path.name.endswith(".tmp"):  # store files, staging
            return
        listed = json.loads((out / RUN_FILE).read_text())["outputs"]
        assert any(relative == o or relative.startswith(o + "/") for o in listed), (relative, listed)
        seen.append(relative)

    real_replace, real_mkdir = os.replace, Path.mkdir

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        check(dst)
        real_replace(src, dst, *args, **kwargs)

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if not self.exists():
            check(self)
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    return seen
