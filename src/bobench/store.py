"""Results store: one SQLite file holding every score of every battle, with what a rerun needs.

One row per (backbone, task, dataset, protocol, seed, config_hash, metric); a failed cell is one row with
``metric = ''``, ``status = 'failed'`` and its error. Stdlib ``sqlite3`` in WAL mode: the runner's driver
process is the single writer, and readers in other processes (report, CLI, notebooks) never block it.
The schema (:mod:`bobench.store_schema`) evolves through :data:`MIGRATIONS`, tracked by
``PRAGMA user_version``; ``MIGRATIONS`` and ``SCHEMA_VERSION`` are importable from here too.

Example:
    >>> from bobench.metrics import Metric
    >>> with ResultStore(tmp / "results.db") as store:
    ...     cell = Cell("timm:resnet18", "cls-digits", "digits", "linear", seed=0, config_hash="ab12")
    ...     store.record(cell, [Metric("top1", 0.93, higher_is_better=True)], config={"lr": 0.1})
    ...     store.has_result(cell), store.results().shape
    (True, (1, 26))
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, astuple, dataclass, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bobench import provenance as _provenance
from bobench.store_schema import COLUMNS, DTYPES, KEY, MIGRATIONS, SCHEMA_VERSION, statements

if TYPE_CHECKING:
    import pandas as pd

    from bobench.metrics import Metric


__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Cell", "ResultStore", "SchemaVersionError", "StoreError"]

_FILTERS = (*KEY, "metric")
_BUSY_TIMEOUT_MS = 30_000  # a reader or a second opener waits this long for a lock before erroring


class StoreError(RuntimeError):
    """The results store cannot do what was asked (read-only, unmigrated, ...)."""


class SchemaVersionError(StoreError):
    """The database was written by a newer bobench than this one."""


@dataclass(frozen=True)
class Cell:
    """One unit of work in a battle: a backbone evaluated on one task/dataset/protocol with one seed.

    Two cells are the same cell (and replace each other's rows) iff all six fields are equal.

    Attributes:
        backbone, task, dataset, protocol: non-empty names.
        seed: integer seed.
        config_hash: hash of the fully resolved config of this cell (task version included); a changed
            config therefore makes a new cell, never overwriting the old scores.
    """

    backbone: str
    task: str
    dataset: str
    protocol: str
    seed: int = 0
    config_hash: str = ""

    def __post_init__(self) -> None:
        for name in ("backbone", "task", "dataset", "protocol"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"Cell.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"Cell.seed must be an int, got {self.seed!r}")


class ResultStore:
    """SQLite results store with replace-per-cell semantics.

    Args:
        path: database file; its parent directory is created (unless ``readonly``).
        readonly: open for reading only; the file must exist and be migrated already.

    Raises:
        SchemaVersionError: the file was written by a newer bobench.
        StoreError: ``readonly`` and the file needs a migration.
        FileNotFoundError: ``readonly`` and the file does not exist.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        # isolation_level=None: no implicit transactions; every write goes through _transaction().
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no results database at {self.path}")
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            if not readonly:
                # Persistent in the file; lets readers in other processes read while the driver writes.
                # synchronous stays FULL: a cell costs minutes of compute, an fsync per cell milliseconds.
                self._conn.execute("PRAGMA journal_mode = WAL")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    @property
    def schema_version(self) -> int:
        """The ``PRAGMA user_version`` of the open database (== :data:`SCHEMA_VERSION` once opened)."""
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    # -- writing -------------------------------------------------------------------------------------

    def record(
        self,
        cell: Cell,
        metrics: Iterable[Metric],
        *,
        config: Mapping[str, Any],
        card: Mapping[str, Any] | Any | None = None,
        provenance: Mapping[str, Any] | None = None,
        device: str = "",
        dtype: str = "",
        wall_time_s: float | None = None,
        img_per_s: float | None = None,
        peak_mem_mb: float | None = None,
        n_train: int | None = None,
        n_test: int | None = None,
    ) -> None:
        """Store the scores of ``cell``, replacing all its earlier rows (ok or failed) in one transaction.

        Args:
            cell: the cell that was run.
            metrics: at least one; names unique and non-empty; values finite (bool/int become float).
            config: the fully resolved config, JSON-serialisable (paths and dataclasses are converted).
            card: the BackboneCard (or its ``to_dict()``).
            provenance: as :func:`bobench.provenance.collect`, which fills it when None.
            device, dtype, wall_time_s, img_per_s, peak_mem_mb, n_train, n_test: see the schema.

        Raises:
            ValueError: no metrics, a duplicate or empty name, or a NaN/inf value (named in the message).
            TypeError: a value that is not a number.
        """
        metrics = list(metrics)
        if not metrics:
            raise ValueError(f"record() needs at least one metric for {cell}; use record_failure()")
        names = [m.name for m in metrics]
        if "" in names or len(set(names)) != len(names):
            raise ValueError(f"metric names must be unique and non-empty, got {names} for {cell}")
        common = _shared_fields(cell, config, card, provenance, device, dtype, wall_time_s)
        common |= {"img_per_s": _opt(float, img_per_s), "peak_mem_mb": _opt(float, peak_mem_mb)}
        common |= {"n_train": _opt(int, n_train), "n_test": _opt(int, n_test)}
        self._replace(cell, [{**common, **_metric_fields(m, cell), "status": "ok"} for m in metrics])

    def record_failure(
        self,
        cell: Cell,
        error: str | BaseException,
        *,
        config: Mapping[str, Any],
        card: Mapping[str, Any] | Any | None = None,
        provenance: Mapping[str, Any] | None = None,
        device: str = "",
        dtype: str = "",
        wall_time_s: float | None = None,
    ) -> None:
        """Store ``cell`` as failed with ``error``, replacing ALL its earlier rows, ok ones included.

        The store holds the outcome of the latest attempt of a cell, never a mix: a forced rerun that
        fails must not leave old scores that :meth:`has_result` would count as done and the analysis
        would rank, next to a failure that says the code no longer produces them. Scores of other
        configs are other cells (``config_hash``) and are untouched. The runner only re-attempts a cell
        that is already ok when the user forces it.

        Args:
            error: a message, or the exception (its traceback is stored).
            Others: as in :meth:`record`.
        """
        if isinstance(error, BaseException):
            error = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        if not error:
            raise ValueError(f"record_failure() needs a non-empty error for {cell}")
        row = _shared_fields(cell, config, card, provenance, device, dtype, wall_time_s)
        row.update(metric="", status="failed", error=str(error))
        self._replace(cell, [row])

    def _replace(self, cell: Cell, rows: list[dict[str, Any]]) -> None:
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only; cannot record {cell}")
        columns = list(rows[0])
        insert = f"INSERT INTO results ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        with self._transaction():
            self._conn.execute(f"DELETE FROM results WHERE {_where(KEY)}", astuple(cell))
            self._conn.executemany(insert, [[r[c] for c in columns] for r in rows])

    # -- reading -------------------------------------------------------------------------------------

    def has_result(self, cell: Cell) -> bool:
        """True iff ``cell`` has ok rows; a failed (or never run) cell is False, so it gets retried."""
        sql = f"SELECT 1 FROM results WHERE {_where(KEY)} AND status = 'ok' LIMIT 1"
        return self._conn.execute(sql, astuple(cell)).fetchone() is not None

    def failures(self) -> list[dict[str, Any]]:
        """All failed cells, oldest first, as full rows (JSON columns as text)."""
        sql = f"SELECT {', '.join(COLUMNS)} FROM results WHERE status = 'failed' ORDER BY id"
        return [dict(zip(COLUMNS, row, strict=True)) for row in self._conn.execute(sql)]

    def results(self, *, status: str | None = "ok", **filters: Any) -> pd.DataFrame:
        """The results table in long format (one row per metric), ordered by ``id``.

        Args:
            status: ``"ok"`` (default), ``"failed"``, or None for all rows.
            **filters: ``backbone``, ``task``, ``dataset``, ``protocol``, ``seed``, ``config_hash`` or
                ``metric`` equal to a value, or in a list/tuple/set of values.

        Returns:
            A DataFrame with every schema column, in a fixed order. Text columns (``*_json`` included:
            ``json.loads`` them) are ``string``, ``higher_is_better`` nullable ``boolean``,
            ``n_train``/``n_test`` nullable ``Int64``, other numbers ``float64``/``int64``.

        Raises:
            ValueError: an unknown filter or status.
        """
        import pandas as pd

        if status not in ("ok", "failed", None):
            raise ValueError(f"status must be 'ok', 'failed' or None, got {status!r}")
        unknown = sorted(set(filters) - set(_FILTERS))
        if unknown:
            raise ValueError(f"unknown filter(s) {unknown}; allowed: {', '.join(_FILTERS)}")
        clauses, params = [], []
        for name, want in {**filters, **({"status": status} if status else {})}.items():
            values = list(want) if isinstance(want, list | tuple | set | frozenset) else [want]
            clauses.append(f"{name} IN ({', '.join('?' * len(values))})" if values else "0")
            params.extend(values)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        cursor = self._conn.execute(f"SELECT {', '.join(COLUMNS)} FROM results {where} ORDER BY id", params)
        return pd.DataFrame.from_records(cursor.fetchall(), columns=list(COLUMNS)).astype(DTYPES)

    def export(self, path: str | os.PathLike[str], fmt: str | None = None) -> Path:
        """Write every row (ok and failed; see ``status``) to CSV or Parquet, long format.

        The file is written to a temporary name and renamed, so a reader never sees half of it. CSV
        cannot tell NULL from ``''``: both become an empty field.

        Args:
            path: output file; its parent directory is created.
            fmt: ``"csv"`` or ``"parquet"``; None takes it from the suffix (``.csv``, ``.parquet``, ``.pq``).

        Returns:
            The path written.

        Raises:
            ValueError: an unknown format, naming the supported ones.
        """
        path = Path(path)
        fmt = (fmt or {".pq": "parquet"}.get(path.suffix.lower(), path.suffix.lower().lstrip("."))).lower()
        if fmt not in ("csv", "parquet"):
            raise ValueError(f"unknown export format {fmt!r} for {path}; use one of: csv, parquet")
        frame = self.results(status=None)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            if fmt == "csv":
                frame.to_csv(tmp, index=False)
            else:
                frame.to_parquet(tmp, engine="pyarrow", index=False)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    # -- lifecycle -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front, so two openers migrating at once queue (busy_timeout)
        # instead of failing half-way with SQLITE_BUSY on lock upgrade.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._conn.in_transaction:  # SQLite may have rolled back already (e.g. on SQLITE_FULL)
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _migrate(self) -> None:
        found = self.schema_version
        if found > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path} was written by a newer bobench (schema {found} > {SCHEMA_VERSION}); "
                "upgrade bobench"
            )
        if found == SCHEMA_VERSION:
            return
        if self.readonly:
            raise StoreError(
                f"{self.path} has schema {found} < {SCHEMA_VERSION}; open it once without readonly to migrate"
            )
        for version, step in MIGRATIONS:
            if version <= found:
                continue
            with self._transaction():
                # Re-read under the write lock: another process may have migrated while we waited.
                if self.schema_version >= version:
                    continue
                if callable(step):
                    step(self._conn)
                else:
                    # Not executescript(): it COMMITs first, which would break the transaction.
                    for statement in statements(step):
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {int(version)}")


def _shared_fields(cell, config, card, provenance, device, dtype, wall_time_s) -> dict[str, Any]:
    """Row fields shared by every row of one recording of ``cell`` (arguments as in ``record``)."""
    prov = dict(_provenance.collect() if provenance is None else provenance)
    if card is not None and not isinstance(card, Mapping) and hasattr(card, "to_dict"):
        card = card.to_dict()  # a BackboneCard
    return {
        **dict(zip(KEY, astuple(cell), strict=True)),
        "config_json": _dumps(config),
        "card_json": None if card is None else _dumps(card),
        "bobench_version": prov.get("bobench_version") or None,
        "git_hash": prov.get("git_hash") or None,
        "library_versions_json": _dumps(prov.get("library_versions", {})),
        "environment_json": _dumps({k: prov[k] for k in ("python", "platform", "hostname") if k in prov}),
        # '' and NULL both mean "unknown"; store NULL only, so new rows, v1 rows and exports agree.
        "device": device or None,
        "dtype": dtype or None,
        "wall_time_s": _opt(float, wall_time_s),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    }


def _where(columns: Iterable[str]) -> str:
    return " AND ".join(f"{c} = ?" for c in columns)


def _metric_fields(metric: Metric, cell: Cell) -> dict[str, Any]:
    try:
        if isinstance(metric.value, str | bytes):  # float("0.5") would pass: a string score is a bug
            raise TypeError
        value = float(metric.value)  # bool, int, numpy scalars, 0-d tensors
    except (TypeError, ValueError):
        raise TypeError(f"metric {metric.name!r} of {cell} has non-numeric value {metric.value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"metric {metric.name!r} of {cell} is {value}: non-finite scores are a bug upstream")
    return {"metric": metric.name, "value": value, "higher_is_better": int(bool(metric.higher_is_better))}


def _opt(kind: type, value: Any) -> Any:
    return None if value is None else kind(value)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def _json_default(obj: Any) -> Any:
    # Resolved configs carry paths, frozen dataclasses and numpy scalars; anything else is a bug to see.
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if callable(getattr(obj, "tolist", None)):  # numpy scalars and arrays, tensors
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} {obj!r} as JSON in the results store")
