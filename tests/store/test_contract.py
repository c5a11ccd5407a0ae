"""The results contract as properties of the store: a run writes and records only paths it created, never replaces
a file no run wrote, leaves no results before its first finished unit and no temporary file whatever kills it,
hashes no output of its own as input, and refuses (naming file and line, touching nothing) a record of the wrong
structure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import kradapter
from kradapter.store import LOCK_FILE, RECORDS_FILE, RUN_FILE, RunSpec, Store, StoreError, file_hash

SRC = str(Path(kradapter.__file__).parents[1])  # the kradapter under test, wherever it is


def spec(kind: str = "bench", **settings: object) -> RunSpec:
    return RunSpec(kind, {"x": 1, **settings}, {"methods": ["lora"]})


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def test_overwrite_deletes_the_folders_a_run_made_never_one_that_was_there(tmp_path: Path) -> None:
    """Issue 23.1: a run writing into the user's ``adapters/`` records ``adapters/kradapter`` (what it made), so
    ``--overwrite`` removes that and leaves ``adapters/mine``."""
    mine = tmp_path / "adapters" / "mine" / "adapter_config.json"
    mine.parent.mkdir(parents=True)
    mine.write_text("x")
    with Store.open(tmp_path, spec()) as store:
        made = store.make_dir("adapters/kradapter/seed0_lr0.1")
        (made / "w.bin").write_bytes(b"w")
        store.add(("run", "kradapter", 0), {"v": 1})
        assert store.meta["outputs"] == ["adapters/kradapter"]
    with Store.open(tmp_path, spec(), "overwrite"):
        pass
    assert mine.read_text() == "x" and not (tmp_path / "adapters" / "kradapter").exists()


def test_a_folder_that_was_there_is_never_recorded(tmp_path: Path) -> None:
    (tmp_path / "adapters").mkdir()
    with Store.open(tmp_path, spec()) as store, pytest.raises(StoreError, match=r"adapters.*before this run"):
        store.written("adapters")


@pytest.mark.parametrize("name", ["spectra.png", "finetune_table.md", "adapters/lora"])
def test_a_declared_output_that_no_run_wrote_stops_the_opening(tmp_path: Path, name: str) -> None:
    """Issue 23.2: the user's file of an output's name stops the run when the folder is opened, before any work,
    in every mode, and is left as it was."""
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("mine")
    before = snapshot(tmp_path)
    outputs = ["results.json", "spectra.png", "finetune_table.md", "adapters/lora"]
    for mode in ("new", "resume", "overwrite"):
        with pytest.raises(StoreError, match=rf"holds {name}, which this run would write"):
            Store.open(tmp_path, spec(), mode, outputs=outputs)
        assert snapshot(tmp_path) == before


def test_any_write_over_a_file_no_run_wrote_is_refused(tmp_path: Path) -> None:
    (tmp_path / "table.md").write_text("mine")
    with Store.open(tmp_path, spec()) as store:
        store.add(("a",), {})
        with pytest.raises(StoreError, match=r"table.md was in the output folder before this run"):
            store.write_text("table.md", "theirs")
    assert (tmp_path / "table.md").read_text() == "mine"


def test_a_resumed_run_may_rewrite_its_own_outputs(tmp_path: Path) -> None:
    outputs = ["results.json", "adapters/lora"]
    with Store.open(tmp_path, spec(), outputs=outputs) as store:
        store.add(("a",), {})
        store.write_json("results.json", {"n": 1})
        store.make_dir("adapters/lora/seed0")
    with Store.open(tmp_path, spec(), "resume", outputs=outputs) as store:
        store.write_json("results.json", {"n": 2})
        store.make_dir("adapters/lora/seed1")
    assert json.loads((tmp_path / "results.json").read_text()) == {"n": 2}


def test_a_run_that_finished_no_unit_leaves_no_results_and_a_corrected_run_starts(tmp_path: Path) -> None:
    """Issue 23.3 (the store's half): a run that fails before its first unit (a bad device) wrote no results
    document, so a corrected run starts there, with or without --resume."""
    with Store.open(tmp_path, spec(device="cuda"), outputs=["results.json"]) as store:
        store.write_json("results.json", {"runs": {}})  # the document rebuilt before the first unit
        store.make_dir(".trainer")
    assert not (tmp_path / "results.json").exists()
    for mode in ("new", "resume"):
        with Store.open(tmp_path, spec(device="cpu"), mode, outputs=["results.json"]) as store:
            assert store.records == {} and store.meta["settings"]["device"] == "cpu"


def test_a_dangling_output_link_is_one_error(tmp_path: Path) -> None:
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(StoreError, match=r"symbolic link to .*nowhere, which does not exist"):
        Store.open(dangling, spec())


def test_an_unwritable_output_folder_is_one_error(tmp_path: Path) -> None:
    """Issue 23.8: a read-only existing folder is a StoreError naming the folder (not an OSError from .lock)."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("running as a user who may write anywhere")
        with pytest.raises(StoreError, match=r"cannot write in the output folder .*ro"):
            Store.open(read_only, spec())
    finally:
        read_only.chmod(0o755)


def _records(tmp_path: Path, kind: str, lines: list[object]) -> Path:
    with Store.open(tmp_path, spec(kind)):
        pass
    (tmp_path / RECORDS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return tmp_path / RECORDS_FILE


GOOD_RUN = {"seed": 0, "lr": 0.001, "test": {"accuracy": 0.5, "macro_f1": 0.4, "loss": 1.0}}
GOOD_CELL = {"relative_frobenius_error": 0.5, "params": 10}


@pytest.mark.parametrize(
    "kind, good, bad",
    [
        ("finetune", {"key": ["run", "lora", 0], "record": GOOD_RUN}, {"key": ["run", "lora", 1], "record": {}}),
        ("finetune", {"key": ["run", "lora", 0], "record": GOOD_RUN}, {"key": ["run", "lora", 1], "record": [1]}),
        ("finetune", {"key": ["run", "lora", 0], "record": GOOD_RUN}, {"key": ["sweep", "lora"], "record": {}}),
        (
            "finetune",
            {"key": ["run", "lora", 0], "record": GOOD_RUN},
            {"key": ["run", "lora", 1], "record": {**GOOD_RUN, "test": "high"}},
        ),
        ("compare", {"key": ["cell", "a", "lora", 1], "record": GOOD_CELL}, {"key": [{"a": 1}], "record": {}}),
        ("compare", {"key": ["cell", "a", "lora", 1], "record": GOOD_CELL}, {"key": "cell", "record": {}}),
        ("compare", {"key": ["cell", "a", "lora", 1], "record": GOOD_CELL}, {"key": ["cell", "a", "lora", 2]}),
        (
            "compare",
            {"key": ["cell", "a", "lora", 1], "record": GOOD_CELL},
            {"key": ["cell", "a", "lora", 2], "record": {"relative_frobenius_error": "low"}},
        ),
        (
            "shift",
            {"key": ["b", "c", "run", "lora", 0], "record": GOOD_RUN},
            {"key": ["b", "c", "run", "x", 0], "record": {"seed": 0}},
        ),
    ],
)
def test_a_record_of_the_wrong_structure_stops_naming_file_and_line(tmp_path: Path, kind, good, bad) -> None:
    """Issue 23.8: a record line of the wrong structure (a ``{}`` run that would drop its seed from the mean, a key
    that is not a list of names) is refused naming the file and line; nothing is touched."""
    path = _records(tmp_path, kind, [good, bad])
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match=rf"{path} line 2 is not a record") as info:
        Store.open(tmp_path, spec(kind), "resume")
    assert "\n" not in str(info.value)
    assert snapshot(tmp_path) == before


def test_a_good_record_of_each_study_reads_back(tmp_path: Path) -> None:
    _records(tmp_path, "finetune", [{"key": ["run", "lora", 0], "record": GOOD_RUN}])
    with Store.open(tmp_path, spec("finetune"), "resume") as store:
        assert store.records[("run", "lora", 0)] == GOOD_RUN


def test_a_deleted_run_file_is_diagnosed_as_such(tmp_path: Path) -> None:
    """Issue 23.8: ``run.json`` deleted, then --resume: named as missing, not as an older version's folder."""
    with Store.open(tmp_path, spec(), legacy=["results.json"]) as store:
        store.add(("a",), {})
        store.write_json("results.json", {})
    (tmp_path / RUN_FILE).unlink()
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match=f"its {RUN_FILE} is missing") as info:
        Store.open(tmp_path, spec(), "resume", legacy=["results.json"])
    assert "older version" not in str(info.value)
    assert snapshot(tmp_path) == before


def test_input_hashes_never_include_the_runs_own_output_folder(tmp_path: Path) -> None:
    """An output folder inside (or equal to) an input folder: the input's hash is the same after the run wrote."""
    data = tmp_path / "data"
    (data / "class").mkdir(parents=True)
    (data / "class" / "a.txt").write_text("text")
    for out in (data / "run", data):
        before = file_hash(data)
        with Store.open(out, spec()) as store:
            store.add(("a",), {})
            store.write_json("results.json", {})
            (store.make_dir("adapters/x") / "w").write_text("w")
        assert file_hash(data) == before
        with Store.open(out, spec(), "overwrite"):
            pass


KILLED = textwrap.dedent(
    """
    import sys
    from kradapter.store import RunSpec, Store
    store = Store.open(sys.argv[1], RunSpec("bench", {"x": 1}), "overwrite")
    store.add(("a",), {})
    print("ready", flush=True)
    payload = "x" * (8 << 20)
    while True:
        store.write_text("big.txt", payload)
    """
)


def test_no_temporary_file_outlives_a_killed_run(tmp_path: Path) -> None:
    """SIGKILL in the middle of atomic writes, several times: the file is the old or the new one, and the store's
    temporary files are gone (unnamed while written; the next opening deletes one a kill left while renaming)."""
    env = {**os.environ, "PYTHONPATH": SRC}
    for delay in (0.0, 0.05, 0.13, 0.31):
        child = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path)], stdout=subprocess.PIPE, env=env)
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        left = [p.name for p in tmp_path.rglob("*") if p.name not in (RUN_FILE, RECORDS_FILE, LOCK_FILE, "big.txt")]
        # the data is written to an unnamed file: at most a kill in the instant between naming and renaming leaves
        # one named temporary file, which the next opening deletes (below)
        assert len(left) <= 1 and all(name.endswith(".kratmp") for name in left), left
        if left:
            with Store.open(tmp_path, RunSpec("bench", {"x": 1}), "resume"):
                pass
            assert not list(tmp_path.glob("*.kratmp"))
        big = tmp_path / "big.txt"
        assert not big.exists() or big.stat().st_size == 8 << 20
    (tmp_path / ".big.txt.1.abcd.kratmp").write_bytes(b"half")  # what a kill between naming and renaming leaves
    with Store.open(tmp_path, RunSpec("bench", {"x": 1}), "resume"):
        pass
    assert not list(tmp_path.glob("*.kratmp"))
