"""The results store: finished results never replaced without --overwrite, resumed only with the settings and
inputs that made them, one run per folder at a time, atomic writes with ordinary modes, unreadable files refused
and left untouched."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from kradapter.files import TMP_SUFFIX
from kradapter.store import (
    LOCK_FILE,
    RECORDS_FILE,
    RUN_FILE,
    SCHEMA_VERSION,
    RunSpec,
    Store,
    StoreError,
    file_hash,
    write_atomic,
)
from tests import support

SETTINGS = {"training.lr": 0.1, "training.iterations": 5, "runtime.dtype": "float32"}


def spec(
    settings: dict | None = None,  # type: ignore[type-arg]
    axes: dict | None = None,  # type: ignore[type-arg]
    inputs: dict | None = None,  # type: ignore[type-arg]
    per_value: dict | None = None,  # type: ignore[type-arg]
) -> RunSpec:
    return RunSpec(
        "bench",
        {**SETTINGS, **(settings or {})},
        axes if axes is not None else {"matrices": ["a"], "methods": ["lora"], "seeds": [1]},
        inputs or {},
        per_value if per_value is not None else {"methods": {"lora": {}}},
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes, by relative name (the lock file aside: it names the current holder)."""
    return support.snapshot(directory, skip=(LOCK_FILE,))


def finished(directory: Path, run: RunSpec | None = None) -> dict[str, bytes]:
    """A folder holding one finished run: two records and a derived file; returns its bytes."""
    with Store.open(directory, run or spec()) as store:
        store.add(("cell", "a", "lora", 1), {"error_value": 0.5})
        store.add(("target", "a", 1), {"shape": [3, 4]})
        store.write_json("experimental_results.json", {"n": 2})
    return snapshot(directory)


def test_a_folder_with_results_is_never_replaced_without_a_flag(tmp_path: Path) -> None:
    before = finished(tmp_path)
    with pytest.raises(StoreError) as info:
        Store.open(tmp_path, spec())
    message = str(info.value)
    assert "--resume" in message and "--overwrite" in message and str(tmp_path) in message
    assert "\n" not in message
    assert snapshot(tmp_path) == before
    # Results of an older version (a legacy file only) count as results too.
    legacy = tmp_path / "old"
    legacy.mkdir()
    (legacy / "experimental_results.json").write_text("{}")
    with pytest.raises(StoreError, match=r"experimental_results\.json.*--resume.*--overwrite"):
        Store.open(legacy, spec(), legacy=["experimental_results.json"])
    assert (legacy / "experimental_results.json").read_text() == "{}"
    # ... and cannot be resumed (no settings to check), only overwritten.
    with pytest.raises(StoreError, match=r"older version of kradapter.*--overwrite"):
        Store.open(legacy, spec(), "resume", legacy=["experimental_results.json"])


def test_resume_keeps_records_and_reads_them_back(tmp_path: Path) -> None:
    finished(tmp_path)
    with Store.open(tmp_path, spec(), "resume") as store:
        assert store.resumed
        assert store.done(("cell", "a", "lora", 1)) and not store.done(("cell", "a", "lora", 2))
        assert store.records[("cell", "a", "lora", 1)] == {"error_value": 0.5}
        store.add(("cell", "a", "lora", 2), {"error": "failed"})
        assert not store.done(("cell", "a", "lora", 2))  # a failure is tried again
    meta = json.loads((tmp_path / RUN_FILE).read_text())
    assert [i["mode"] for i in meta["invocations"]] == ["new", "resume"]
    assert meta["outputs"] == ["experimental_results.json"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"runtime.dtype": "float64"}, "setting runtime.dtype: 'float32' -> 'float64'"),
        ({"training.iterations": 7}, "setting training.iterations: 5 -> 7"),
        ({"training.new_knob": True}, "setting training.new_knob: '<unset>' -> True"),
    ],
)
def test_resume_with_a_changed_setting_names_it_and_both_values(tmp_path: Path, change, expected) -> None:
    before = finished(tmp_path)
    with pytest.raises(StoreError) as info:
        Store.open(tmp_path, spec(change), "resume")
    assert expected in str(info.value) and "--overwrite" in str(info.value)
    assert snapshot(tmp_path) == before


def test_resume_names_every_differing_setting(tmp_path: Path) -> None:
    finished(tmp_path)
    with pytest.raises(StoreError) as info:
        Store.open(tmp_path, spec({"training.lr": 0.2, "runtime.dtype": "bfloat16"}), "resume")
    assert "training.lr: 0.1 -> 0.2" in str(info.value)
    assert "runtime.dtype: 'float32' -> 'bfloat16'" in str(info.value)


def test_resume_may_grow_the_axes(tmp_path: Path) -> None:
    finished(tmp_path)
    more = {"matrices": ["b", "a"], "methods": ["kradapter", "lora"], "seeds": [2, 1]}
    per_value = {"methods": {"lora": {}, "kradapter": {"scaling": 2.0}}}
    with Store.open(tmp_path, spec(axes=more, per_value=per_value), "resume") as store:
        assert store.done(("cell", "a", "lora", 1))
    meta = json.loads((tmp_path / RUN_FILE).read_text())
    assert meta["axes"] == {"matrices": ["a", "b"], "methods": ["lora", "kradapter"], "seeds": [1, 2]}
    assert meta["per_value"]["methods"]["kradapter"] == {"scaling": 2.0}
    # A later resume with fewer values keeps the axes run so far.
    with Store.open(tmp_path, spec(per_value=per_value), "resume"):
        pass
    assert json.loads((tmp_path / RUN_FILE).read_text())["axes"]["seeds"] == [1, 2]


def test_resume_refuses_a_changed_per_value_setting(tmp_path: Path) -> None:
    """A method's own settings (``methods.settings.lora``) must match for a method run before."""
    finished(tmp_path, spec(per_value={"methods": {"lora": {"r": 4}}}))
    before = snapshot(tmp_path)
    with pytest.raises(StoreError) as info:
        Store.open(tmp_path, spec(per_value={"methods": {"lora": {"r": 8}}}), "resume")
    assert "methods lora: r: 4 -> 8" in str(info.value)
    with pytest.raises(StoreError, match=r"methods lora: lora_dropout: '<unset>' -> 0\.1"):
        Store.open(tmp_path, spec(per_value={"methods": {"lora": {"r": 4, "lora_dropout": 0.1}}}), "resume")
    assert snapshot(tmp_path) == before


def test_resume_refuses_a_changed_input_file(tmp_path: Path) -> None:
    """The same user-matrix name with other content is another study."""
    matrix = tmp_path / "w.npy"
    matrix.write_bytes(b"first content")
    out = tmp_path / "out"
    first = file_hash(matrix)
    before = finished(out, spec(inputs={"matrix mine": first}))
    matrix.write_bytes(b"other content")
    second = file_hash(matrix)
    assert second != first and second.startswith("sha256:")
    with pytest.raises(StoreError) as info:
        Store.open(out, spec(inputs={"matrix mine": second}), "resume")
    assert f"input matrix mine: content {first} -> {second}" in str(info.value)
    assert snapshot(out) == before
    matrix.write_bytes(b"first content")  # the same bytes again: resumes
    with Store.open(out, spec(inputs={"matrix mine": file_hash(matrix)}), "resume") as store:
        assert store.done(("cell", "a", "lora", 1))


def test_file_hash_of_a_folder_sees_names_and_contents(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"x")
    first = file_hash(tmp_path / "d")
    (tmp_path / "d" / "a").rename(tmp_path / "d" / "b")
    assert file_hash(tmp_path / "d") != first
    (tmp_path / "d" / "b").rename(tmp_path / "d" / "a")
    assert file_hash(tmp_path / "d") == first


def test_overwrite_deletes_exactly_the_earlier_outputs(tmp_path: Path) -> None:
    with Store.open(tmp_path, spec()) as store:
        store.add(("cell", "a", "lora", 1), {"v": 1})
        store.write_json("experimental_results.json", {"n": 1})
        store.write_text("table.txt", "x")
        adapters = tmp_path / "adapters" / "lora"
        adapters.mkdir(parents=True)
        (adapters / "adapter_model.safetensors").write_bytes(b"weights")
        store.written(tmp_path / "adapters")
    (tmp_path / "legacy.json").write_text("{}")
    (tmp_path / "notes.md").write_text("mine, not the run's")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.bin").write_bytes(b"keep")
    with Store.open(tmp_path, spec({"training.lr": 0.3}), "overwrite", legacy=["legacy.json"]) as store:
        assert store.records == {} and not store.resumed
        remaining = snapshot(tmp_path)
    assert set(remaining) == {RUN_FILE, "notes.md", "data/keep.bin"}
    assert remaining["notes.md"] == b"mine, not the run's" and remaining["data/keep.bin"] == b"keep"
    meta = json.loads(remaining[RUN_FILE])
    assert meta["settings"]["training.lr"] == 0.3 and meta["outputs"] == []
    assert [i["mode"] for i in meta["invocations"]] == ["overwrite"]


def test_overwrite_never_deletes_outside_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    with Store.open(out, spec()):
        pass
    meta = json.loads((out / RUN_FILE).read_text())
    meta["outputs"] = ["../precious.txt", str(outside)]
    (out / RUN_FILE).write_text(json.dumps(meta))
    with Store.open(out, spec(), "overwrite"):
        pass
    assert outside.read_text() == "keep"


def test_a_second_open_in_this_process_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    with Store.open(tmp_path, spec()):
        with pytest.raises(StoreError, match=rf"in use by another run \(pid {os.getpid()} on "):
            Store.open(tmp_path, spec(), "resume")
        with pytest.raises(StoreError, match="in use"):
            Store.open(tmp_path, spec(), "overwrite")
        assert not (tmp_path / RECORDS_FILE).exists()
    with Store.open(tmp_path, spec(), "resume"):  # released on close
        pass


def test_a_second_run_from_another_process_fails_at_once_naming_its_pid(tmp_path: Path) -> None:
    with (
        support.store_held(tmp_path, "new") as holder,
        pytest.raises(StoreError, match=rf"in use by another run \(pid {holder.pid} on "),
    ):
        Store.open(tmp_path, RunSpec("compare", {"x": 1}), "resume")
    with Store.open(tmp_path, RunSpec("compare", {"x": 1}), "resume"):  # free once the holder closed
        pass
    # A holder killed outright releases the lock too (the kernel drops flock with the process).
    holder = support.start_holder(support.STORE_HOLDER, tmp_path, "resume")
    holder.kill()
    holder.wait(timeout=60)
    with Store.open(tmp_path, RunSpec("compare", {"x": 1}), "resume"):
        pass


@pytest.mark.parametrize("then", ["name", "unlock", "nothing"])
def test_a_run_refused_in_the_holders_first_or_last_moment_still_names_it_or_gets_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """The race two concurrent runs met: the lock file is empty while held. A refused run looks again for the holder's
    name; the folder comes free while it looks, it takes it; a holder that never names itself is 'another process'."""
    import threading

    import kradapter.store as store_module

    monkeypatch.setattr(store_module, "HOLDER_WAIT_S", 5.0 if then != "nothing" else 0.3)
    with Store.open(tmp_path, spec()):
        pass
    holder = support.start_holder(support.BARE_HOLDER, tmp_path / LOCK_FILE)  # holds the lock, names no one yet
    try:
        if then != "nothing":
            timer = threading.Timer(0.3, lambda: (holder.stdin.write(then + "\n"), holder.stdin.flush()))  # type: ignore[union-attr]
            timer.start()
        if then == "unlock":
            with Store.open(tmp_path, spec(), "resume"):
                pass
        else:
            expected = r"pid 4242 on elsewhere" if then == "name" else "another process"
            with pytest.raises(StoreError, match=rf"in use by another run \({expected}"):
                Store.open(tmp_path, spec(), "resume")
        if then != "nothing":
            timer.join()
    finally:
        holder.kill()
        holder.wait(timeout=60)


def test_files_have_ordinary_modes(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with Store.open(tmp_path / "out", spec()) as store:
            store.add(("cell", "a", "lora", 1), {"v": 1})
            store.write_json("experimental_results.json", {"n": 1})
            store.write_text("table.txt", "x")
        write_atomic(tmp_path / "out" / "plot.png", b"\x89PNG")
    finally:
        os.umask(old)
    for name in (RUN_FILE, RECORDS_FILE, "experimental_results.json", "table.txt", "plot.png"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name
    assert not [p.name for p in (tmp_path / "out").rglob("*") if p.name.endswith((".tmp", TMP_SUFFIX))]


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_atomic(path, "old\n")

    class Boom:
        def encode(self, _: str) -> bytes:
            raise RuntimeError("disk full")

    with pytest.raises((RuntimeError, TypeError)):
        write_atomic(path, Boom())  # type: ignore[arg-type]
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def _meta(directory: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((directory / RUN_FILE).read_text())


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda meta: "[1, 2, 3]\n", "not a run description"),
        (lambda meta: json.dumps({**meta, "schema_version": SCHEMA_VERSION + 1}), "schema_version 2"),
        (lambda meta: json.dumps({k: v for k, v in meta.items() if k != "schema_version"}), "schema_version None"),
        (lambda meta: json.dumps({**meta, "settings": [1]}), "'settings' is missing or not a dict"),
        (lambda meta: json.dumps({**meta, "kind": "finetune"}), "is a 'finetune' run, not 'bench'"),
        (lambda meta: json.dumps({**meta, "per_value": [1]}), "'per_value' is not a table of tables"),
        (lambda meta: json.dumps({**meta, "per_value": {"methods": 3}}), "'per_value' is not a table of tables"),
        (lambda meta: json.dumps(meta, indent=1)[:40], "cannot read"),
        (lambda meta: "\xff\xfe not text", "cannot read"),
    ],
    ids=[
        "list",
        "newer-schema",
        "no-schema",
        "settings-type",
        "other-kind",
        "per-value-list",
        "per-value-axis",
        "truncated",
        "not-utf8",
    ],
)
def test_an_unreadable_run_file_is_an_error_and_left_untouched(tmp_path: Path, damage, match) -> None:
    finished(tmp_path)
    text = damage(_meta(tmp_path))
    (tmp_path / RUN_FILE).write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match=match) as info:
        Store.open(tmp_path, spec(), "resume")
    assert "\n" not in str(info.value) and RUN_FILE in str(info.value)
    assert snapshot(tmp_path) == before
    with pytest.raises(StoreError, match="--resume"):  # and a plain run refuses it as results, too
        Store.open(tmp_path, spec())
    assert snapshot(tmp_path) == before


def test_an_interrupted_append_is_repaired_on_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    finished(tmp_path)
    records = tmp_path / RECORDS_FILE
    complete = records.read_bytes()
    records.write_bytes(complete + b'{"key":["cell","a","lora",2],"rec')  # killed mid-write
    with Store.open(tmp_path, spec(), "resume") as store:
        assert set(store.records) == {("cell", "a", "lora", 1), ("target", "a", 1)}
        assert records.read_bytes() == complete
        store.add(("cell", "a", "lora", 2), {"v": 2})
    assert "dropped an unfinished record" in capsys.readouterr().err
    lines = records.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1]) == {"key": ["cell", "a", "lora", 2], "record": {"v": 2}}
    with Store.open(tmp_path, spec(), "resume") as store:
        assert store.records[("cell", "a", "lora", 2)] == {"v": 2}


def test_an_interrupted_first_append_leaves_no_records(tmp_path: Path) -> None:
    with Store.open(tmp_path, spec()):
        pass
    (tmp_path / RECORDS_FILE).write_bytes(b'{"key":["cell"')
    with Store.open(tmp_path, spec(), "resume") as store:
        assert store.records == {}
    assert not (tmp_path / RECORDS_FILE).exists()  # a run that finished nothing: what it wrote is gone


@pytest.mark.parametrize(
    "bad",
    [b"not json\n", b'{"key": ["cell"]}\n', b"[1, 2]\n", b"\xff\xfe\n"],
    ids=["text", "no-record", "list", "bytes"],
)
def test_a_corrupt_complete_record_line_is_an_error(tmp_path: Path, bad: bytes) -> None:
    finished(tmp_path)
    records = tmp_path / RECORDS_FILE
    lines = records.read_bytes().splitlines(keepends=True)
    records.write_bytes(lines[0] + bad + lines[1])
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match=rf"{RECORDS_FILE} line 2 is not a record.*left untouched") as info:
        Store.open(tmp_path, spec(), "resume")
    assert "\n" not in str(info.value)
    assert snapshot(tmp_path) == before


def test_an_out_path_naming_a_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("precious")
    for mode in ("new", "resume", "overwrite"):
        with pytest.raises(StoreError, match=r"results\.json exists and is not a folder"):
            Store.open(path, spec(), mode)
    assert path.read_text() == "precious"
    with pytest.raises(StoreError, match="cannot create the output folder"):
        Store.open(path / "sub", spec())
    with pytest.raises(StoreError, match="unknown mode 'append'"):
        Store.open(tmp_path / "x", spec(), "append")


def test_a_read_only_store_writes_nothing(tmp_path: Path) -> None:
    """``writer=False`` (the other processes of a distributed job): no lock, no file written, records readable."""
    before = finished(tmp_path)
    with Store.open(tmp_path, spec(), "resume") as holder:
        reader = Store.open(tmp_path, spec(), "resume", writer=False)
        assert reader.done(("cell", "a", "lora", 1))
        reader.add(("cell", "b", "lora", 1), {"v": 3})
        reader.write_json("experimental_results.json", {"other": True})
        reader.close()
        holder.add(("cell", "a", "lora", 9), {"v": 9})
    after = snapshot(tmp_path)
    assert after["experimental_results.json"] == before["experimental_results.json"]
    assert b'"b"' not in after[RECORDS_FILE]


def test_reading_a_run_as_it_stands_takes_no_lock_and_writes_nothing(tmp_path: Path) -> None:
    """``Store.read`` (``--report-only``): the finished records of a folder another run holds, its unfinished last
    append skipped but not cut, every byte left as it was; other settings or no run are errors naming why."""
    finished(tmp_path)
    with Store.open(tmp_path, spec(), "resume") as holder:
        holder.add(("cell", "a", "lora", 2), {"error_value": 0.25})
        with (tmp_path / RECORDS_FILE).open("a") as f:
            f.write('{"key": ["cell", "a", "lora", 3], "rec')  # the holder is half way through an append
        before = snapshot(tmp_path)
        reader = Store.read(tmp_path, spec())
        assert reader.lock is None and reader.records[("cell", "a", "lora", 2)] == {"error_value": 0.25}
        assert ("cell", "a", "lora", 3) not in reader.records and len(reader.records) == 3
        reader.add(("cell", "b", "lora", 1), {"v": 3})
        reader.write_json("experimental_results.json", {"other": True})
        reader.save_meta()
        assert snapshot(tmp_path) == before
    with pytest.raises(StoreError, match=r"cannot read .*training\.lr.*Give the settings it was run with"):
        Store.read(tmp_path, spec({"training.lr": 0.2}))
    with pytest.raises(StoreError, match=r"holds no run to read \(run\.json is missing\)"):
        Store.read(tmp_path / "elsewhere", spec())


def test_a_run_that_finished_nothing_holds_no_results(tmp_path: Path) -> None:
    """A run stopped before its first record (a bad input found after opening, a failing device, a kill) leaves no
    results: derived files are not written before the first record, and a new run, with any settings, with or
    without --resume, starts over what it left (deleting its scratch outputs); one that wrote a record does not."""
    with Store.open(tmp_path, spec()) as store:
        store.write_json("experimental_results.json", {"runs": {}})
        store.write_text("table.txt", "x")
        store.make_dir(".trainer")
        (tmp_path / ".trainer" / "scratch").write_text("s")
    assert not (tmp_path / "experimental_results.json").exists() and not (tmp_path / "table.txt").exists()
    with Store.open(tmp_path, spec({"training.lr": 0.7})) as store:
        assert store.records == {} and store.meta["settings"]["training.lr"] == 0.7
        assert not (tmp_path / ".trainer").exists()
    meta = json.loads((tmp_path / RUN_FILE).read_text())
    assert [i["mode"] for i in meta["invocations"]] == ["new"]
    with Store.open(tmp_path, spec({"training.lr": 0.9}), "resume") as store:  # nothing to resume: starts afresh
        assert store.meta["settings"]["training.lr"] == 0.9
        store.add(("cell", "a", "lora", 1), {"v": 1})
        store.write_text("table.txt", "x")
    assert (tmp_path / "table.txt").read_text() == "x"
    with pytest.raises(StoreError, match="--resume"):
        Store.open(tmp_path, spec())


class Killed(BaseException):
    """The process stopping at this instant (no handler runs: it is not an Exception)."""


def _killed_after(monkeypatch: pytest.MonkeyPatch, target: object, name: str, path: Path) -> None:
    """Make ``target.name`` do its work, then stop the process if it was called on ``path``."""
    real = getattr(target, name)

    def then_killed(where, *args, **kwargs):  # type: ignore[no-untyped-def]
        real(where, *args, **kwargs)
        if Path(where) == path:
            raise Killed

    monkeypatch.setattr(target, name, then_killed)


@pytest.mark.parametrize("write", ["write_json", "write_text", "make_dir", "writing"])
def test_a_kill_right_after_a_write_leaves_a_folder_that_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: str
) -> None:
    """Each output is listed in run.json before it exists: a kill the instant after it was written leaves no file
    that "no run wrote" (which a resume must refuse to replace), and the resumed run writes it again."""
    import kradapter.store as store_module

    name = {"write_json": "results.json", "write_text": "table.md", "make_dir": "adapters/lora"}.get(write, "plot.png")
    with Store.open(tmp_path, spec()) as store:
        store.add(("cell", "a", "lora", 1), {"v": 1})
        with monkeypatch.context() as patch, pytest.raises(Killed):
            if write == "write_json":
                _killed_after(patch, store_module, "write_json", tmp_path / name)
                store.write_json(name, {"n": 1})
            elif write == "write_text":
                _killed_after(patch, store_module, "write_atomic", tmp_path / name)
                store.write_text(name, "| a |")
            elif write == "make_dir":
                _killed_after(patch, Path, "mkdir", tmp_path / "adapters")
                store.make_dir(name)
            else:
                with store.writing(name) as path:
                    path.write_bytes(b"png")
                    raise Killed
    assert (tmp_path / name.split("/")[0]).exists()  # make_dir: killed once its outer folder was made
    assert name.split("/")[0] in json.loads((tmp_path / RUN_FILE).read_text())["outputs"]
    with Store.open(tmp_path, spec(), "resume") as store:
        if write == "make_dir":
            assert store.make_dir(name).is_dir()
        else:
            store.write_text(name, "again")
            assert (tmp_path / name).read_text() == "again"
    with Store.open(tmp_path, spec(), "overwrite"):  # and --overwrite deletes it as the run's
        assert not (tmp_path / name.split("/")[0]).exists()


def test_an_output_that_was_not_written_is_unlisted(tmp_path: Path) -> None:
    with Store.open(tmp_path, spec()) as store:
        store.add(("cell", "a", "lora", 1), {"v": 1})
        with store.writing("none.png"):
            pass  # the plot had nothing to draw
        with pytest.raises(ValueError, match="boom"), store.writing("failed.png"):
            raise ValueError("boom")
        with store.writing("drawn.png") as path:
            path.write_bytes(b"png")
    assert json.loads((tmp_path / RUN_FILE).read_text())["outputs"] == ["drawn.png"]
    (tmp_path / "none.png").write_bytes(b"mine")  # a file of the user's, of the same name: never the run's
    with Store.open(tmp_path, spec(), "overwrite"):
        pass
    assert (tmp_path / "none.png").read_bytes() == b"mine" and not (tmp_path / "drawn.png").exists()


def test_every_output_is_listed_before_it_appears(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the matrix study's command with its plots (the shift study: tests/finetune/test_shift_study.py)."""
    from kradapter.cli import main

    out = tmp_path / "out"
    seen = support.listed_before_written(monkeypatch, out)
    args = ["compare", "--size", "11x13", "--iterations", "5", "--quiet", "--matrices", "random_noise"]
    assert main([*args, "--methods", "lora", "--out", str(out)]) == 0
    assert {"experimental_results.json", "peft_comparison.png", "spectra.png", "effective_rank.png"} <= set(seen)
