"""Results store and provenance: real SQLite files in tmp_path, no network, no models."""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
from dataclasses import astuple
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from bobench import provenance
from bobench.metrics import Metric
from bobench.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Cell,
    ResultStore,
    SchemaVersionError,
    StoreError,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROV = {
    "bobench_version": "9.9.9",
    "git_hash": "a" * 40,
    "python": "3.11.7",
    "platform": "Linux-test",
    "hostname": "testhost",
    "library_versions": {"torch": "2.14.1", "numpy": "2.0.0"},
}
CELL = Cell("timm:resnet18", "cls-digits", "digits", "linear", seed=0, config_hash="c0ffee")
CONFIG = {"task": {"name": "cls-digits", "version": 2}, "protocol": {"C": [0.1, 1.0]}, "root": Path("/d")}
METRICS = [Metric("top1", 0.93, higher_is_better=True), Metric("nll", 0.25, higher_is_better=False)]


@pytest.fixture
def store(tmp_path: Path):
    with ResultStore(tmp_path / "sub" / "results.db") as s:
        yield s


def _record(store: ResultStore, cell: Cell = CELL, metrics=METRICS, **kw) -> None:
    store.record(cell, metrics, config=kw.pop("config", CONFIG), provenance=kw.pop("provenance", PROV), **kw)


def _raw_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        n = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    conn.close()  # the context manager only commits
    return n


def test_record_roundtrip(store: ResultStore) -> None:
    assert not store.has_result(CELL)
    card = {"name": "timm:resnet18", "mean": [0.485, 0.456, 0.406], "params": 11689512}
    run = {"device": "cpu: test", "dtype": "float32", "wall_time_s": 1.5, "img_per_s": 40.0}
    run |= {"peak_mem_mb": 512.0, "n_train": 800, "n_test": 200}
    _record(store, card=card, **run)
    assert store.has_result(CELL)
    df = store.results()
    assert list(df.metric) == ["top1", "nll"]
    assert list(df.value) == [0.93, 0.25]
    assert list(df.higher_is_better) == [True, False]
    row = df.iloc[0]
    key = ("backbone", "task", "dataset", "protocol", "seed", "config_hash")
    assert tuple(row[k] for k in key) == astuple(CELL)
    assert row.status == "ok"
    assert pd.isna(row.error)
    assert json.loads(row.config_json) == {**CONFIG, "root": "/d"}  # paths stored as strings
    assert json.loads(row.card_json) == card
    assert (row.bobench_version, row.git_hash) == ("9.9.9", "a" * 40)
    assert json.loads(row.library_versions_json) == PROV["library_versions"]
    assert json.loads(row.environment_json) == {k: PROV[k] for k in ("python", "platform", "hostname")}
    assert {k: row[k] for k in run} == run  # row["dtype"]: a Series' .dtype is its own dtype
    created = datetime.fromisoformat(row.created_at)
    assert created.utcoffset() == timedelta(0)
    assert store.schema_version == SCHEMA_VERSION


def test_record_accepts_card_object_and_fills_provenance(store: ResultStore) -> None:
    class Card:  # duck-typed BackboneCard
        def to_dict(self) -> dict:
            return {"name": "x", "input_size": [3, 64, 64]}

    store.record(CELL, METRICS, config={}, card=Card())
    row = store.results().iloc[0]
    assert json.loads(row.card_json) == {"name": "x", "input_size": [3, 64, 64]}
    assert row.bobench_version == provenance.collect()["bobench_version"]
    assert json.loads(row.library_versions_json) == provenance.collect()["library_versions"]


def test_values_coerced_to_float(store: ResultStore) -> None:
    _record(store, metrics=[Metric("flag", True, True), Metric("count", 3, False)])
    df = store.results()
    assert df.value.dtype == "float64"
    assert list(df.value) == [1.0, 3.0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_value_rejected_and_old_rows_kept(store: ResultStore, bad: float) -> None:
    _record(store)
    with pytest.raises(ValueError, match="'nll'"):
        _record(store, metrics=[Metric("top1", 0.5, True), Metric("nll", bad, False)])
    assert list(store.results().value) == [0.93, 0.25]  # validated before anything was deleted


@pytest.mark.parametrize(
    ("metrics", "error", "match"),
    [
        ([], ValueError, "at least one metric"),
        ([Metric("a", 1.0, True), Metric("a", 2.0, True)], ValueError, "unique"),
        ([Metric("", 1.0, True)], ValueError, "non-empty"),
        ([Metric("a", "0.5", True)], TypeError, "'a'.*non-numeric"),  # type: ignore[arg-type]
        ([Metric("a", None, True)], TypeError, "'a'.*non-numeric"),  # type: ignore[arg-type]
    ],
)
def test_bad_metrics_rejected(store: ResultStore, metrics: list[Metric], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _record(store, metrics=metrics)
    assert not store.has_result(CELL)


def test_cell_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="backbone"):
        Cell("", "t", "d", "p")
    with pytest.raises(TypeError, match="seed"):
        Cell("b", "t", "d", "p", seed=1.0)  # type: ignore[arg-type]


def test_record_twice_replaces(store: ResultStore) -> None:
    _record(store)
    _record(store, metrics=[Metric("top1", 0.95, True)])  # a --force rerun with fewer metrics
    df = store.results(status=None)
    assert list(zip(df.metric, df.value, strict=True)) == [("top1", 0.95)]
    assert _raw_count(store.path) == 1


def test_failure_then_success_leaves_only_ok_rows(store: ResultStore) -> None:
    store.record_failure(CELL, "CUDA out of memory", config=CONFIG, provenance=PROV, wall_time_s=3.0)
    assert not store.has_result(CELL)  # a failed cell is retried
    [failure] = store.failures()
    assert (failure["metric"], failure["status"], failure["error"]) == ("", "failed", "CUDA out of memory")
    assert failure["value"] is None and failure["higher_is_better"] is None
    assert failure["wall_time_s"] == 3.0
    assert store.results().empty
    assert len(store.results(status="failed")) == 1

    _record(store)
    assert store.has_result(CELL)
    assert store.failures() == []
    assert set(store.results(status=None).status) == {"ok"}
    assert _raw_count(store.path) == 2


def test_failure_replaces_ok_rows_of_the_same_cell_only(store: ResultStore) -> None:
    other = Cell(CELL.backbone, CELL.task, CELL.dataset, CELL.protocol, seed=0, config_hash="other-config")
    _record(store)
    _record(store, cell=other)
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        store.record_failure(CELL, exc, config=CONFIG, provenance=PROV)  # a forced rerun that fails
    assert not store.has_result(CELL)
    assert store.has_result(other)  # another config is another cell: untouched
    [failure] = store.failures()
    assert failure["error"].startswith("Traceback") and "RuntimeError: boom" in failure["error"]
    assert list(store.results().config_hash.unique()) == ["other-config"]
    with pytest.raises(ValueError, match="non-empty error"):
        store.record_failure(CELL, "", config=CONFIG, provenance=PROV)


def test_unique_index_rejects_raw_duplicate(store: ResultStore) -> None:
    _record(store)
    columns = "backbone, task, dataset, protocol, seed, config_hash, metric, status, config_json, created_at"
    conn = sqlite3.connect(store.path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            conn.execute(
                f"INSERT INTO results ({columns}) SELECT {columns} FROM results WHERE metric = 'top1'"
            )
    finally:
        conn.close()


def test_results_filters(store: ResultStore) -> None:
    for backbone in ("a", "b"):
        for seed in (0, 1, 2):
            _record(store, cell=Cell(backbone, "t", "d", "linear", seed=seed, config_hash="h"))
    assert len(store.results()) == 12
    assert set(store.results(backbone="a").backbone) == {"a"}
    assert sorted(set(store.results(backbone="b", seed=[0, 2]).seed)) == [0, 2]
    assert list(store.results(metric="nll", seed=1).backbone) == ["a", "b"]
    assert store.results(seed=[]).empty
    empty = store.results(backbone="zzz")
    assert (
        empty.empty
        and empty.value.dtype == "float64"
        and list(empty.columns) == list(store.results().columns)
    )
    with pytest.raises(ValueError, match="allowed: backbone"):
        store.results(model="a")
    with pytest.raises(ValueError, match="status"):
        store.results(status="done")


def test_fresh_database_is_wal_at_latest_schema(store: ResultStore) -> None:
    assert [v for v, _ in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


# A frozen copy of schema v1 as released: the migration must carry such files forward.
V1_SCHEMA = """
CREATE TABLE results (
    id INTEGER PRIMARY KEY, backbone TEXT NOT NULL, task TEXT NOT NULL, dataset TEXT NOT NULL,
    protocol TEXT NOT NULL, seed INTEGER NOT NULL, config_hash TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL, higher_is_better INTEGER, status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT, config_json TEXT NOT NULL, card_json TEXT, bobench_version TEXT, git_hash TEXT,
    library_versions_json TEXT, device TEXT, wall_time_s REAL, n_train INTEGER, n_test INTEGER,
    created_at TEXT NOT NULL
);
PRAGMA user_version = 1;
"""


def test_migration_from_v1_keeps_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    insert = (
        "INSERT INTO results (backbone, task, dataset, protocol, seed, config_hash, metric, value,"
        " higher_is_better, status, config_json, device, n_train, created_at)"
        " VALUES ('b', 't', 'd', 'linear', 0, 'h', 'top1', ?, 1, 'ok', '{\"lr\": 0.1}', 'cpu', 10, ?)"
    )
    conn.execute(insert, (0.5, "2025-01-01T00:00:00+00:00"))  # v1 allowed duplicates: the newest wins
    conn.execute(insert, (0.7, "2025-01-02T00:00:00+00:00"))
    conn.commit()
    conn.close()

    with ResultStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        cell = Cell("b", "t", "d", "linear", seed=0, config_hash="h")
        assert store.has_result(cell)
        [row] = store.results().itertuples()
        old = {"metric": "top1", "value": 0.7, "higher_is_better": True, "device": "cpu", "n_train": 10}
        assert {k: getattr(row, k) for k in old} == old
        assert json.loads(row.config_json) == {"lr": 0.1}
        assert pd.isna(row.dtype) and pd.isna(row.img_per_s) and pd.isna(row.peak_mem_mb)
        assert pd.isna(row.environment_json)
        _record(store, cell=cell, metrics=METRICS[:1], img_per_s=12.0)  # new columns and unique index work
        [row] = store.results().itertuples()
        assert (row.value, row.img_per_s) == (0.93, 12.0)
    with ResultStore(path) as again:  # reopening applies nothing twice
        assert again.schema_version == SCHEMA_VERSION


def test_released_v1_step_is_unchanged() -> None:
    def columns(script: str) -> list[tuple]:
        conn = sqlite3.connect(":memory:")
        try:
            conn.executescript(script)
            return conn.execute("PRAGMA table_info(results)").fetchall()
        finally:
            conn.close()

    assert MIGRATIONS[0][0] == 1
    assert columns(MIGRATIONS[0][1]) == columns(V1_SCHEMA)  # type: ignore[arg-type]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    expected = rf"newer bobench \(schema {SCHEMA_VERSION + 1} > {SCHEMA_VERSION}\); upgrade bobench"
    with pytest.raises(SchemaVersionError, match=expected):
        ResultStore(path)
    with pytest.raises(SchemaVersionError):
        ResultStore(path, readonly=True)


def test_readonly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no results database"):
        ResultStore(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()
    with ResultStore(tmp_path / "r.db") as store:
        _record(store)
    with ResultStore(tmp_path / "r.db", readonly=True) as ro:
        assert ro.has_result(CELL) and len(ro.results()) == 2
        with pytest.raises(StoreError, match="read-only"):
            _record(ro)
    sqlite3.connect(tmp_path / "empty.db").close()  # exists, but never migrated
    with pytest.raises(StoreError, match="without readonly"):
        ResultStore(tmp_path / "empty.db", readonly=True)


def _filled(store: ResultStore) -> pd.DataFrame:
    _record(store, n_train=800, device="cpu: test", img_per_s=30.5)
    _record(store, cell=Cell("b", "t", "d", "knn", seed=1, config_hash="h"), card={"name": "b"})
    store.record_failure(Cell("c", "t", "d", "knn"), "boom, with a comma\nand a line", config={"k": 20})
    return store.results(status=None)


def test_export_parquet_roundtrip(store: ResultStore, tmp_path: Path) -> None:
    expected = _filled(store)
    out = store.export(tmp_path / "out" / "results.parquet")
    assert out == tmp_path / "out" / "results.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(out), expected)
    pd.testing.assert_frame_equal(pd.read_parquet(store.export(tmp_path / "x.data", fmt="parquet")), expected)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.parquet"]  # no temp file left


def test_export_csv_roundtrip(store: ResultStore, tmp_path: Path) -> None:
    expected = _filled(store)
    back = pd.read_csv(store.export(tmp_path / "results.csv"))
    assert list(back.columns) == list(expected.columns) and len(back) == 5

    # CSV has no types and cannot tell NULL from '': compare values as plain objects, '' as missing.
    def plain(df: pd.DataFrame) -> list[list[object]]:
        return [
            [None if pd.isna(v) or v == "" else v for v in row] for row in df.astype(object).values.tolist()
        ]

    assert plain(back) == plain(expected)
    assert back.error.iloc[-1] == "boom, with a comma\nand a line"


def test_export_unknown_format(store: ResultStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="csv, parquet"):
        store.export(tmp_path / "results.xlsx")
    with pytest.raises(ValueError, match="csv, parquet"):
        store.export(tmp_path / "results.csv", fmt="json")


# The reader answers each "read" line on stdin with the number of rows it sees then: the writer decides when
# the reader reads, so every interleaving below happens on every run, however busy the machine.
READER = textwrap.dedent(
    """
    import sys
    from bobench.store import ResultStore

    with ResultStore(sys.argv[1], readonly=True) as store:
        print("ready", flush=True)
        for line in sys.stdin:
            print(len(store.results()), flush=True)
    """
)
HANG_S = 120  # only a hung reader takes this long to answer; a busy machine takes well under a second


class _Reader:
    """The READER process, asked to read on demand; ``count()`` returns what it saw."""

    def __init__(self, path: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        # A thread reads the pipe so that a hung reader fails the test after HANG_S instead of blocking it.
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()
        try:
            assert self._next() == "ready"
        except BaseException:
            self.close()
            raise

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)  # EOF: the reader exited

    def _next(self) -> str:
        try:
            line = self.lines.get(timeout=HANG_S)
        except queue.Empty:
            raise AssertionError(f"the reader process gave no answer in {HANG_S} s") from None
        if line is None:
            self.proc.wait(timeout=HANG_S)
            raise AssertionError(
                f"the reader process exited ({self.proc.returncode}): {self.proc.stderr.read()}"
            )
        return line

    def count(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("read\n")
        self.proc.stdin.flush()
        return int(self._next())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # EOF ends the reader's loop
        try:
            self.proc.wait(timeout=HANG_S)
        finally:
            self.proc.kill()  # a no-op once it has exited
            self.proc.wait()
            self.pump.join(timeout=HANG_S)  # it reaches EOF now: closing stdout under it would race
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()


def test_concurrent_reader_in_another_process(store: ResultStore) -> None:
    n_cells = 5
    _record(store, cell=Cell("warmup", "t", "d", "p"))  # the reader opens a migrated file
    reader = _Reader(store.path)
    try:
        seen = [reader.count()]
        mid_write: list[int | str] = []

        def read_before_commit(statement: str) -> None:
            # SQLite calls this as each statement starts: at COMMIT, the cell's rows are written but not
            # committed, and the writer holds the write lock. Exceptions here would be swallowed: keep them.
            if statement.strip().upper() == "COMMIT":
                try:
                    mid_write.append(reader.count())
                except BaseException as exc:
                    mid_write.append(repr(exc))

        store._conn.set_trace_callback(read_before_commit)  # the store's one writer connection
        for i in range(n_cells):
            _record(store, cell=Cell("b", "t", "d", "p", seed=i))
            seen.append(reader.count())
        store._conn.set_trace_callback(None)
    finally:
        reader.close()
    assert reader.proc.returncode == 0
    # it read while the writer held the write lock with a cell half-way, and saw only whole cells before it
    assert mid_write == [2 * (1 + i) for i in range(n_cells)]
    assert seen == [2 * (1 + i) for i in range(n_cells + 1)]  # each commit seen at once, both rows, in order


def test_provenance_collect() -> None:
    info = provenance.collect()
    assert set(info) >= {"bobench_version", "git_hash", "python", "platform", "hostname", "library_versions"}
    assert info["bobench_version"]
    assert re.fullmatch(r"([0-9a-f]{40}(-dirty)?)?", info["git_hash"])
    assert info["library_versions"]["numpy"] and info["library_versions"]["pandas"]
    info["library_versions"].clear()  # a copy: the per-process cache is not mutated
    assert provenance.collect()["library_versions"]


def test_provenance_collect_does_not_import_torch() -> None:
    code = "import sys; from bobench import provenance; provenance.collect(); print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


def test_git_hash_outside_a_checkout_is_empty(tmp_path: Path) -> None:
    assert provenance._git_hash(tmp_path) == ""


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git executable")
def test_git_hash_of_a_checkout(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        config = ["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
        subprocess.run(["git", *config, *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "mod.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "mod.py")
    git("commit", "-q", "-m", "first")
    head = provenance._git_hash(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", head)
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "site.py").write_text("")  # untracked: not dirty, and not a bobench checkout
    assert provenance._git_hash(tmp_path) == head
    assert provenance._git_hash(tmp_path / "venv") == ""
    (tmp_path / "mod.py").write_text("x = 2\n")
    assert provenance._git_hash(tmp_path) == head + "-dirty"


def test_device_info() -> None:
    assert re.fullmatch(r"cpu: .+, \d+ threads", provenance.device_info("cpu"))
    assert provenance.device_info("cuda:0").startswith("cuda:0 ")
    assert provenance.device_info("meta") == "meta"


def test_open_reader_snapshot_does_not_block_the_writer(store: ResultStore) -> None:
    _record(store)
    reader = sqlite3.connect(store.path, isolation_level=None)
    try:
        reader.execute("BEGIN")  # a report half-way through reading: holds a snapshot
        assert reader.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 2
        # With a rollback journal this would wait out the busy timeout, then raise "database is locked"; no
        # bound on its duration here: a clock would only add a way to fail on a busy machine.
        _record(store, cell=Cell("b", "t", "d", "p"))
        assert reader.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 2  # its snapshot is stable
        reader.execute("COMMIT")
        assert reader.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 4
    finally:
        reader.close()
