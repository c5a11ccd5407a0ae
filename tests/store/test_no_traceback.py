"""No traceback from any input: each command fed mutated inputs (a table of mutations over valid ones, and
Hypothesis-drawn flag values) answers with exit status 0, 1 or 2, no "Traceback", and leaves every file that was
there before unchanged. Mutations refused at argument or check time answer fast (the CLI loads no heavy library
before its checks); the rest run under ``-m slow``."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import kradapter

SRC = str(Path(kradapter.__file__).parents[1])  # the kradapter under test, wherever it is
ENV = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
COMPARE = ["compare", "--size", "16x12", "--matrices", "random_noise", "--methods", "lora", "--iterations", "2",
           "--no-plots", "--quiet"]  # fmt: skip


def snapshot(root: Path) -> dict[str, object]:
    """Every file's bytes (a file over 64 MiB, such as a sparse one: its size and modification time)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        if p.stat().st_size < 1 << 26
        else (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def kradapter(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kradapter.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=ENV,
        timeout=timeout,
    )


def check(args: list[str], root: Path, codes: tuple[int, ...] = (0, 1, 2)) -> subprocess.CompletedProcess[str]:
    """Run ``kradapter ARGS`` in ``root``: an allowed exit status, no traceback, every earlier file unchanged."""
    before = snapshot(root)
    paths = sorted(root.rglob("*"))
    run = kradapter(args, root, 120 if codes == (2,) else 600)  # a refusal answers at once; a run may take a while
    assert run.returncode in codes, (args, run.returncode, run.stderr[-2000:])
    assert "Traceback" not in run.stderr, (args, run.stderr[-3000:])
    after = snapshot(root)
    changed = [name for name, data in before.items() if after.get(name) != data]
    assert not changed, (args, changed)
    if run.returncode == 2:
        errors = [line for line in run.stderr.splitlines() if ": error:" in line]
        assert len(errors) == 1, (args, run.stderr[-2000:])
    if codes == (2,):  # refused before any work: not even the output folder was made
        assert sorted(root.rglob("*")) == paths, (args, sorted(set(root.rglob("*")) - set(paths)))
    return run


# -- inputs: (name, how to build it in the folder, the arguments) -------------------------------------------------


def npy_declaring(shape: tuple[int, ...]) -> bytes:
    """A .npy header declaring ``shape`` float32, followed by 16 bytes (a file that claims far more than it holds)."""
    header = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 16


def user_matrix_study(
    content: bytes | Callable[[Path], None], suffix: str = ".npy", key: str = ""
) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        path = root / f"m{suffix}"
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
        key_line = f'key = "{key}"\n' if key else ""
        (root / "study.toml").write_text(
            '[matrices]\ntypes = ["random_noise"]\nsize = [8, 8]\n'
            f'[[matrices.user]]\nname = "mine"\npath = "{path}"\n{key_line}'
            '[methods]\nnames = ["lora"]\n[training]\niterations = 2\n'
        )
        return ["compare", "--config", str(root / "study.toml"), "--no-plots", "--quiet", "--out", str(root / "o")]

    return build


def safetensors_declaring(shape: list[int]) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * int(np.prod(shape))]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


def _static(args: list[str]) -> Callable[[Path], list[str]]:
    return lambda root: [a.replace("{root}", str(root)) for a in args]


def _with(prepare: Callable[[Path], None], args: list[str]) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        prepare(root)
        return _static(args)(root)

    return build


def _dangling(root: Path) -> None:
    (root / "o").symlink_to(root / "missing")


def _file(root: Path) -> None:
    (root / "o").write_text("a file")


def _bad_toml(text: str) -> Callable[[Path], None]:
    return lambda root: (root / "study.toml").write_text(text)


def _adapter(config: object | None, weights: bytes | None = b"") -> Callable[[Path], None]:
    def build(root: Path) -> None:
        folder = root / "adapter"
        folder.mkdir()
        if config is not None:
            (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if weights is not None:
            (folder / "adapter_model.safetensors").write_bytes(weights)

    return build


def _model(config: str | None) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        (root / "model").mkdir()
        if config is not None:
            (root / "model" / "config.json").write_text(config)

    return build


KR = {"peft_type": "KRADAPTER", "base_model_name_or_path": "{root}/nobase", "target_modules": ["q"]}

FAST: dict[str, Callable[[Path], list[str]]] = {
    "compare size text": _static([*COMPARE, "--size", "abc"]),
    "compare size zero": _static([*COMPARE, "--size", "0x5"]),
    "compare size negative": _static([*COMPARE, "--size", "-3x4"]),
    "compare size beyond memory": _static([*COMPARE, "--size", "9999999x9999999", "--out", "{root}/o"]),
    "compare iterations negative": _static([*COMPARE, "--iterations", "-1"]),
    "compare method unknown": _static([*COMPARE, "--methods", "nosuch"]),
    "compare matrix unknown": _static([*COMPARE, "--matrices", "nosuch"]),
    "compare seeds text": _static([*COMPARE, "--seeds", "a,b"]),
    "compare device unknown": _static([*COMPARE, "--device", "tpu"]),
    "compare dtype unknown": _static([*COMPARE, "--dtype", "int8"]),
    "compare threads negative": _static([*COMPARE, "--threads", "-1"]),
    "compare config missing": _static([*COMPARE, "--config", "{root}/none.toml"]),
    "compare config not toml": _with(_bad_toml("[[[ x"), [*COMPARE, "--config", "{root}/study.toml"]),
    "compare config wrong type": _with(
        _bad_toml("[training]\niterations = 'many'\n"), [*COMPARE, "--config", "{root}/study.toml"]
    ),
    "compare config unknown key": _with(
        _bad_toml("[training]\nspeed = 1\n"), [*COMPARE, "--config", "{root}/study.toml"]
    ),
    "compare out a file": _with(_file, [*COMPARE, "--out", "{root}/o"]),
    "compare out dangling link": _with(_dangling, [*COMPARE, "--out", "{root}/o"]),
    "compare user matrix missing": _with(
        _bad_toml('[[matrices.user]]\nname = "m"\npath = "nope.npy"\n'), [*COMPARE, "--config", "{root}/study.toml"]
    ),
    "compare user npy beyond memory": user_matrix_study(npy_declaring((10**6, 10**6))),
    "compare user npy empty": user_matrix_study(b""),
    "compare user npy random": user_matrix_study(np.random.default_rng(0).bytes(300)),
    "compare user safetensors beyond memory": user_matrix_study(
        safetensors_declaring([10**6, 10**6]), ".safetensors", "w"
    ),
    "compare user safetensors random": user_matrix_study(np.random.default_rng(1).bytes(300), ".safetensors", "w"),
    "export adapter missing": _static(["export", "{root}/none", "{root}/out", "--rank", "2"]),
    "export config not json": _with(_adapter("{not json"), ["export", "{root}/adapter", "{root}/out", "--rank", "2"]),
    "export config a list": _with(_adapter("[1, 2]"), ["export", "{root}/adapter", "{root}/out", "--rank", "2"]),
    "export config other type": _with(
        _adapter({"peft_type": "LORA"}), ["export", "{root}/adapter", "{root}/out", "--rank", "2"]
    ),
    "export weights missing": _with(_adapter(KR, None), ["export", "{root}/adapter", "{root}/out", "--rank", "2"]),
    "export rank zero": _with(_adapter(KR), ["export", "{root}/adapter", "{root}/out", "--rank", "0"]),
    "export rank text": _with(_adapter(KR), ["export", "{root}/adapter", "{root}/out", "--rank", "x"]),
    "export max error nan": _with(_adapter(KR), ["export", "{root}/adapter", "{root}/out", "--max-error", "nan"]),
    "export max error two": _with(_adapter(KR), ["export", "{root}/adapter", "{root}/out", "--max-error", "2"]),
    "export dtype unknown": _with(
        _adapter(KR), ["export", "{root}/adapter", "{root}/out", "--rank", "2", "--dtype", "int8"]
    ),
    "export out a file": _with(
        lambda r: (_adapter(KR)(r), _file(r)), ["export", "{root}/adapter", "{root}/o", "--rank", "2"]
    ),
    "export out dangling": _with(
        lambda r: (_adapter(KR)(r), _dangling(r)), ["export", "{root}/adapter", "{root}/o", "--rank", "2"]
    ),
    "export base missing": _with(_adapter(KR), ["export", "{root}/adapter", "{root}/out", "--rank", "2"]),
    "finetune epochs negative": _static(["finetune", "--epochs", "-1", "--out", "{root}/o"]),
    "finetune batch zero": _static(["finetune", "--batch-size", "0", "--out", "{root}/o"]),
    "finetune shots text": _static(["finetune", "--shots", "x", "--out", "{root}/o"]),
    "finetune method unknown": _static(["finetune", "--methods", "nosuch", "--out", "{root}/o"]),
    "finetune device unknown": _static(["finetune", "--device", "tpu", "--out", "{root}/o"]),
    "finetune model missing": _static(["finetune", "--model", "{root}/none", "--out", "{root}/o"]),
    "finetune model empty": _with(_model(None), ["finetune", "--model", "{root}/model", "--out", "{root}/o"]),
    "finetune model config not json": _with(_model("{x"), ["finetune", "--model", "{root}/model", "--out", "{root}/o"]),
    "finetune data missing": _static(["finetune", "--data", "{root}/none", "--out", "{root}/o"]),
    "finetune out a file": _with(_file, ["finetune", "--out", "{root}/o", "--epochs", "1"]),
    "finetune out dangling": _with(_dangling, ["finetune", "--out", "{root}/o", "--epochs", "1"]),
}


def _sparse_npy(path: Path) -> None:
    """A consistent .npy of a 200000x200000 float32 matrix (160 GB) as a sparse file: no disk used, nothing to read."""
    header = npy_declaring((200_000, 200_000))[:-16]
    with path.open("wb") as f:
        f.write(header)
        f.truncate(len(header) + 4 * 200_000 * 200_000)


FAST["compare user npy sparse beyond memory"] = user_matrix_study(_sparse_npy)


EVERYDAY = {  # one of each kind, about a second each; the whole table runs under -m slow
    "compare size beyond memory",
    "compare user npy sparse beyond memory",
    "compare config not toml",
    "compare out dangling link",
    "export config not json",
    "export out dangling",
    "finetune model config not json",
    "finetune out a file",
}


@pytest.mark.parametrize(
    "name", [n if n in EVERYDAY else pytest.param(n, marks=pytest.mark.slow) for n in sorted(FAST)]
)
def test_a_malformed_input_is_one_line_exit_2(tmp_path: Path, name: str) -> None:
    (tmp_path / "keep.txt").write_text("a file of the user's")
    args = FAST[name](tmp_path)
    check(args, tmp_path, codes=(2,))


SLOW: dict[str, Callable[[Path], list[str]]] = {
    "compare device cuda absent": _static([*COMPARE, "--device", "cuda:7", "--out", "{root}/o"]),
    "compare runs beside the user's files": _with(
        lambda r: ((r / "o").mkdir(), (r / "o" / "notes.md").write_text("mine")), [*COMPARE, "--out", "{root}/o"]
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW))
def test_inputs_found_at_run_time_or_valid(tmp_path: Path, name: str) -> None:
    (tmp_path / "keep.txt").write_text("a file of the user's")
    check(SLOW[name](tmp_path), tmp_path)


# -- property-based: drawn values through every check the CLI makes before work ----------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCALARS = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.booleans(),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS, max_size=2))
SECTIONS = {
    "matrices": ["types", "size", "crop", "user", "minilm_layer", "whisper_key", "clip_checkpoint"],
    "methods": ["names", "settings", "references"],
    "training": ["iterations", "lr", "seeds", "optimizer", "loss", "scheduler", "log_interval"],
    "runtime": ["device", "dtype", "threads"],
    "output": ["directory", "results_file", "plots", "dpi", "table"],
}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if value != value
            else ("inf" if value == float("inf") else "-inf" if value == -float("inf") else repr(value))
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(SECTIONS)), st.data(), min_size=1, max_size=3), st.data())
def test_any_study_file_is_checked_or_refused_with_one_error(tmp_path: Path, sections, data) -> None:
    """A study file of drawn keys and values of any type: loading it and building the run's identity (every check
    ``kradapter compare`` makes before work) either succeeds or raises one of the CLI's one-line errors."""
    from kradapter.compare.config import ConfigError, load_config
    from kradapter.compare.inputs import MissingInputError, run_spec

    lines = []
    for section in sections:
        keys = data.draw(st.lists(st.sampled_from(SECTIONS[section]), max_size=3, unique=True))
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(data.draw(VALUES))}" for key in keys]
    path = tmp_path / "study.toml"
    path.write_text("\n".join(lines) + "\n")
    try:
        run_spec(load_config(path))
    except (ConfigError, MissingInputError) as exc:
        assert "\n" not in str(exc)


EXPORT_VALUES = st.one_of(
    st.none(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=8), st.booleans()
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.dictionaries(st.sampled_from(["peft_type", "base_model_name_or_path", "r"]), EXPORT_VALUES),
       rank=EXPORT_VALUES, max_error=EXPORT_VALUES, dtype=EXPORT_VALUES)  # fmt: skip
def test_any_export_request_is_checked_or_refused_with_one_error(
    tmp_path: Path, config, rank, max_error, dtype
) -> None:
    """Drawn adapter configs and export options: ``check_request`` (what ``kradapter export`` checks before loading
    anything) accepts them or raises one ExportError."""
    from kradapter.export import ExportError, check_request

    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    try:
        check_request(folder, tmp_path / "out", rank=rank, max_error=max_error, dtype=dtype)
    except ExportError as exc:
        assert "\n" not in str(exc)
