"""Provenance: every invocation records the library versions, the code (a content hash of the package's source,
the commit and whether the tree was dirty) and the machine; ``--resume`` across a code change is refused unless
asked for, and then recorded; a refused run leaves the folder as it found it (no lock file); an older version's
listing of a whole ``adapters/`` folder is narrowed on resume; one reader of results documents."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from kradapter import records
from kradapter.records import ResultsError, read_results
from kradapter.store import LOCK_FILE, RUN_FILE, FolderLock, RunSpec, Store, StoreError
from tests import support

PACKAGE = Path(records.__file__).resolve().parent
REPORT_DATA = Path(__file__).resolve().parents[1] / "report" / "data"


def spec(kind: str = "bench") -> RunSpec:
    return RunSpec(kind, {"training.lr": 0.1}, {"methods": ["lora"], "seeds": [1]})


def reference_source_hash(root: Path) -> str:
    """sha256 over the ``.py`` files under ``root``: relative name, NUL, bytes, in sorted order of the names'
    parts (written out here, not with the library's hashing helper)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).parts):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return "sha256:" + digest.hexdigest()


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True)
    return done.stdout


def other_code(source: str = "sha256:" + "ab" * 32, commit: str | None = "f" * 40) -> dict[str, Any]:
    return {"source": source, "version": "9.9.9", "commit": commit, "dirty": False, "origin": "git checkout"}


def finished(folder: Path, run: RunSpec | None = None) -> None:
    with Store.open(folder, run or spec()) as store:
        store.add(("cell", "a", "lora", 1), {"value": 0.5})


def invocations(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / RUN_FILE).read_text())["invocations"]


# -- what is recorded ------------------------------------------------------------------------------------------------


def test_every_invocation_records_versions_code_and_machine(tmp_path: Path) -> None:
    finished(tmp_path)
    with Store.open(tmp_path, spec(), "resume") as store:
        store.set_environment({"torch_threads": 3, "gpu": None})
    first, second = invocations(tmp_path)
    for invocation in (first, second):
        env = invocation["environment"]
        for name in ("torch", "peft", "transformers", "numpy", "scipy", "scikit-learn"):
            assert env[name] == metadata.version(name)
        assert env["kradapter"] == __import__("kradapter").__version__
        if support.installed("ray"):
            assert env["ray"] == metadata.version("ray")
        else:
            assert "ray" not in env
        assert env["hostname"] == socket.gethostname()
        assert env["platform"] == platform.platform()
        assert env["cpu_count"] == os.cpu_count()
        assert env["code"]["source"] == reference_source_hash(PACKAGE)
        assert env["code"]["version"] == env["kradapter"]
    assert second["environment"]["torch_threads"] == 3 and "gpu" in second["environment"]  # added, nothing lost
    assert "torch_threads" not in first["environment"]
    assert "code_change" not in second  # same code: nothing to say


def test_the_study_environment_adds_torch_threads_and_the_gpu() -> None:
    import torch

    env = records.environment()
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    assert env["torch"] == torch.__version__
    assert env["code"] == records.code_identity()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_commit_and_dirty_state_of_the_checkout_the_package_runs_from() -> None:
    state = records.git_state()
    try:
        tracked = git(PACKAGE, "ls-files", "--", "__init__.py").strip()
    except subprocess.CalledProcessError:
        tracked = ""
    if not tracked:
        assert state is None
        return
    assert state is not None
    assert state["commit"] == git(PACKAGE, "rev-parse", "HEAD").strip()
    assert state["dirty"] == bool(git(PACKAGE, "status", "--porcelain", "--untracked-files=no").strip())


def copy_package(to: Path) -> Path:
    return Path(shutil.copytree(PACKAGE, to, ignore=shutil.ignore_patterns("__pycache__")))


def test_the_source_hash_is_the_contents_of_the_python_files_only(tmp_path: Path) -> None:
    copy = copy_package(tmp_path / "kradapter")
    base = records.source_hash(copy)
    assert base == reference_source_hash(copy) == reference_source_hash(PACKAGE)
    (copy / "notes.txt").write_text("not code")
    (copy / "store.pyc").write_bytes(b"\0")
    assert records.source_hash(copy) == base
    layer = copy / "tuners" / "base.py"
    layer.write_bytes(layer.read_bytes() + b"\n# one more line\n")
    changed = records.source_hash(copy)
    assert changed != base and changed == reference_source_hash(copy)
    (copy / "tuners" / "extra.py").write_text("X = 1\n")
    assert records.source_hash(copy) not in (base, changed)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_state_of_a_checkout_and_of_an_installed_copy(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    copy = copy_package(repo / "src" / "kradapter")
    assert records.git_state(copy) is None  # not a repository at all
    git(repo, "init", "-q")
    assert records.git_state(copy) is None  # in a repository but not tracked (a wheel in a checkout's venv)
    git(repo, "add", "src")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    state = records.git_state(copy)
    assert state == {"commit": git(repo, "rev-parse", "HEAD").strip(), "dirty": False}
    (copy / "store.py").write_text("# edited\n")
    assert records.git_state(copy) == {"commit": state["commit"], "dirty": True}


def test_describe_code_names_the_commit_or_the_version_and_the_hash() -> None:
    assert records.describe_code(other_code()) == f"commit {'f' * 12}, source sha256:{'ab' * 6}"
    assert records.describe_code({**other_code(), "dirty": True}).startswith(f"commit {'f' * 12} (dirty), ")
    assert records.describe_code(other_code(commit=None)) == f"version 9.9.9, source sha256:{'ab' * 6}"


# -- resume across a code change ----------------------------------------------------------------------------------


def test_resume_with_the_same_code_continues(tmp_path: Path) -> None:
    finished(tmp_path)
    with Store.open(tmp_path, spec(), "resume") as store:
        assert store.done(("cell", "a", "lora", 1))
    assert "code_change" not in invocations(tmp_path)[-1]


def test_resume_across_a_code_change_is_refused_then_allowed_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    finished(tmp_path)
    old = records.code_identity()
    before = support.snapshot(tmp_path, skip=())
    new = other_code()
    monkeypatch.setattr(records, "code_identity", lambda: new)
    with pytest.raises(StoreError) as refused:
        Store.open(tmp_path, spec(), "resume")
    message = str(refused.value)
    assert "\n" not in message and "--allow-code-change" in message
    assert records.describe_code(old) in message and records.describe_code(new) in message
    assert message.index(records.describe_code(old)) < message.index(records.describe_code(new))
    assert support.snapshot(tmp_path, skip=()) == before  # nothing changed, the lock file included
    with Store.open(tmp_path, spec(), "resume", allow_code_change=True) as store:
        assert store.done(("cell", "a", "lora", 1))
        store.add(("cell", "a", "lora", 2), {"value": 0.25})
    last = invocations(tmp_path)[-1]
    assert last["code_change"] == {"from": old, "to": new, "allowed": True}
    assert last["environment"]["code"] == new
    # the latest records were made by the new code: resuming with it needs no flag, going back does
    with Store.open(tmp_path, spec(), "resume") as store:
        assert store.done(("cell", "a", "lora", 2))
    monkeypatch.setattr(records, "code_identity", lambda: old)
    with pytest.raises(StoreError, match="--allow-code-change"):
        Store.open(tmp_path, spec(), "resume")


def test_a_folder_from_before_code_identities_resumes_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    finished(tmp_path)
    meta = json.loads((tmp_path / RUN_FILE).read_text())
    for invocation in meta["invocations"]:  # as the earlier version wrote it: a flat environment, no code
        invocation["environment"] = {"kradapter": "0.1.0", "torch": "2.0"}
    (tmp_path / RUN_FILE).write_text(json.dumps(meta))
    capsys.readouterr()
    with Store.open(tmp_path, spec(), "resume") as store:
        assert store.done(("cell", "a", "lora", 1))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "recorded no code identity" in err
    assert records.describe_code(records.code_identity()) in err
    assert invocations(tmp_path)[-1]["code_change"] == {"from": None, "to": records.code_identity()}


def test_new_and_overwrite_runs_never_ask_about_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    finished(tmp_path)
    monkeypatch.setattr(records, "code_identity", lambda: other_code())
    Store.open(tmp_path, spec(), "overwrite").close()
    assert invocations(tmp_path)[-1]["environment"]["code"] == other_code()


def tiny_compare(out: Path, *extra: str) -> list[str]:
    return [
        "compare",
        "--size",
        "7x5",
        "--iterations",
        "2",
        "--methods",
        "lora",
        "--matrices",
        "random_noise",
        "--seeds",
        "1",
        "--threads",
        "1",
        "--no-plots",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def test_compare_refuses_a_resume_across_a_code_change_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kradapter.cli import main

    out = tmp_path / "run"
    assert main(tiny_compare(out)) == 0
    monkeypatch.setattr(records, "code_identity", lambda: other_code())
    capsys.readouterr()
    assert main(tiny_compare(out, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kradapter compare: error: cannot resume") and "Traceback" not in err
    assert main(tiny_compare(out, "--resume", "--allow-code-change")) == 0
    assert invocations(out)[-1]["code_change"]["to"] == other_code()


def test_finetune_and_shift_take_the_flag() -> None:
    import argparse

    from kradapter.finetune.commands import add_recipe_arguments

    parser = argparse.ArgumentParser()
    add_recipe_arguments(parser, "out")
    assert parser.parse_args(["--resume", "--allow-code-change"]).allow_code_change
    assert not parser.parse_args([]).allow_code_change


def test_open_store_passes_the_permission_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kradapter.finetune.commands import open_store

    finished(tmp_path)
    monkeypatch.setattr(records, "code_identity", lambda: other_code())
    with pytest.raises(StoreError, match="other code"):
        open_store(str(tmp_path), spec(), "resume", 0, 1, "cpu", [])
    open_store(str(tmp_path), spec(), "resume", 0, 1, "cpu", [], allow_code_change=True).close()
    assert invocations(tmp_path)[-1]["code_change"]["allowed"] is True


# -- a refused run leaves no lock file -------------------------------------------------------------------------------


def test_a_refused_run_leaves_no_lock_file_it_made(tmp_path: Path) -> None:
    (tmp_path / "experimental_results.json").write_text("{}")  # an older version's results, no run.json
    before = support.snapshot(tmp_path, skip=())
    with pytest.raises(StoreError, match="older version"):
        Store.open(tmp_path, spec(), "resume", legacy=["experimental_results.json"])
    with pytest.raises(StoreError, match="earlier run"):
        Store.open(tmp_path, spec(), "new", legacy=["experimental_results.json"])
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "plot.png").write_bytes(b"mine")
    with pytest.raises(StoreError, match="no run there wrote it"):
        Store.open(clash, spec(), outputs=["plot.png"])
    assert support.snapshot(tmp_path, skip=()) == {**before, "clash/plot.png": b"mine"}
    assert not (tmp_path / LOCK_FILE).exists() and not (clash / LOCK_FILE).exists()


def test_a_refused_run_keeps_a_lock_file_that_was_there(tmp_path: Path) -> None:
    finished(tmp_path)
    assert (tmp_path / LOCK_FILE).exists()
    with pytest.raises(StoreError):
        Store.open(tmp_path, spec(), "new")
    assert (tmp_path / LOCK_FILE).exists()
    Store.open(tmp_path, spec(), "resume").close()  # and the folder opens as before


def test_a_run_waiting_on_a_removed_lock_file_locks_the_new_one(tmp_path: Path) -> None:
    first = FolderLock(tmp_path)
    first.acquire()
    assert first.created
    stale = (tmp_path / LOCK_FILE).open("a+", encoding="utf-8")  # opened by a second run before the removal
    first.discard()
    assert not (tmp_path / LOCK_FILE).exists()
    second = FolderLock(tmp_path)
    opened = iter([stale])
    real_open = second._open
    second._open = lambda: next(opened, None) or real_open()  # type: ignore[method-assign]
    second.acquire()
    assert second.handle is not None and second.handle is not stale
    assert os.fstat(second.handle.fileno()).st_ino == os.stat(tmp_path / LOCK_FILE).st_ino
    third = FolderLock(tmp_path)
    with pytest.raises(StoreError, match="in use by another run"):
        third.acquire()
    second.release()


# -- an older version's listing of a whole adapters/ folder ------------------------------------------------------


def test_resume_narrows_an_older_listing_of_the_whole_adapters_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Store.open(tmp_path, spec()) as store:
        store.make_dir("adapters/lora/seed1")
        (tmp_path / "adapters/lora/seed1/adapter.bin").write_bytes(b"weights")
        store.add(("run", "lora", 1), {"value": 0.5})
    meta = json.loads((tmp_path / RUN_FILE).read_text())
    meta["outputs"] = ["adapters"]  # as versions before the per-method listing wrote it
    (tmp_path / RUN_FILE).write_text(json.dumps(meta))
    (tmp_path / "adapters/mine").mkdir()
    (tmp_path / "adapters/mine/notes.txt").write_text("my own")
    outputs = ["adapters/lora", "adapters/kradapter"]
    capsys.readouterr()
    with Store.open(tmp_path, spec(), "resume", outputs=outputs) as store:
        assert store.meta["outputs"] == ["adapters/lora"]
        with pytest.raises(StoreError, match="was in the output folder before this run"):
            store.claim("adapters/mine/notes.txt")
        store.make_dir("adapters/kradapter/seed1")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "listed the whole folder adapters" in err and "adapters/lora" in err
    assert json.loads((tmp_path / RUN_FILE).read_text())["outputs"] == ["adapters/lora", "adapters/kradapter"]
    Store.open(tmp_path, spec(), "overwrite").close()
    assert not (tmp_path / "adapters/lora").exists() and not (tmp_path / "adapters/kradapter").exists()
    assert (tmp_path / "adapters/mine/notes.txt").read_text() == "my own"


def test_overwrite_deletes_only_the_run_s_part_of_an_older_listing_of_adapters(tmp_path: Path) -> None:
    with Store.open(tmp_path, spec()) as store:
        store.make_dir("adapters/lora/seed1")
        store.make_dir("adapters/dora/seed1")  # a method of the earlier run that this one does not run
        store.add(("run", "lora", 1), {"value": 0.5})
        store.add(("run", "dora", 1), {"value": 0.5})
    meta = json.loads((tmp_path / RUN_FILE).read_text())
    meta["outputs"] = ["adapters"]
    (tmp_path / RUN_FILE).write_text(json.dumps(meta))
    (tmp_path / "adapters/mine").mkdir()
    (tmp_path / "adapters/mine/notes.txt").write_text("my own")
    Store.open(tmp_path, spec(), "overwrite", outputs=["adapters/lora"]).close()
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["mine"]
    assert (tmp_path / "adapters/mine/notes.txt").read_text() == "my own"


def test_an_older_listing_of_a_folder_that_is_gone_is_dropped(tmp_path: Path) -> None:
    finished(tmp_path)
    meta = json.loads((tmp_path / RUN_FILE).read_text())
    meta["outputs"] = ["adapters"]
    (tmp_path / RUN_FILE).write_text(json.dumps(meta))
    with Store.open(tmp_path, spec(), "resume", outputs=["adapters/lora"]) as store:
        assert store.meta["outputs"] == []
        store.make_dir("adapters/lora")
    assert json.loads((tmp_path / RUN_FILE).read_text())["outputs"] == ["adapters"]  # it made adapters itself


# -- one reader of results documents -------------------------------------------------------------------------------


def test_one_reader_for_the_report_and_the_peft_export(tmp_path: Path) -> None:
    from kradapter import method_comparison
    from kradapter.report import data as report_data

    folder = Path(shutil.copytree(REPORT_DATA / "finetune", tmp_path / "finetune"))
    document = json.loads((folder / "finetune_results.json").read_text())
    assert read_results(folder, "finetune") == ("finetune", document) == read_results(folder)
    assert method_comparison.load_finetune(folder) == document
    assert report_data.load(folder).kind == "finetune"
    for content, message in (
        ("{not json", "cannot read"),
        ("[1, 2]", "does not hold a results object"),
        ('{"settings": {}}', "has no 'runs': not a finetune results file"),
    ):
        (folder / "finetune_results.json").write_text(content)
        with pytest.raises(ResultsError, match=message):
            read_results(folder)
        with pytest.raises(method_comparison.ExportError, match=message):
            method_comparison.load_finetune(folder)
        with pytest.raises(report_data.ReportError, match=message):
            report_data.load(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(method_comparison.ExportError, match=r"holds no finetune_results\.json"):
        method_comparison.load_finetune(empty)
    with pytest.raises(report_data.ReportError, match="is not a results folder"):
        report_data.load(empty)


def test_reading_results_imports_nothing_heavy() -> None:
    code = (
        "import sys; from kradapter import records; from kradapter.store import Store;"
        "records.provenance();"
        "print(sorted(m for m in ('torch', 'numpy', 'peft', 'transformers') if m in sys.modules))"
    )
    done = support.run_python("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
