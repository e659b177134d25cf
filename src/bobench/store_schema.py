r"""Schema of the results database: the DDL of each version, its migrations, and the column contract.

:class:`bobench.store.ResultStore` applies :data:`MIGRATIONS` in order and tracks the applied version in
``PRAGMA user_version``; :data:`COLUMNS` and :data:`DTYPES` fix the shape of what it reads back.

Example:
    >>> SCHEMA_VERSION, [v for v, _ in MIGRATIONS]
    (2, [1, 2])
    >>> list(statements("INSERT INTO t VALUES ('a;b'); -- one\nDROP TABLE t;\n"))
    ["INSERT INTO t VALUES ('a;b'); -- one\n", 'DROP TABLE t;\n']
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator

# Ordered (version, step): a SQL script or a callable(conn). Each runs in its own transaction together with
# `PRAGMA user_version = version`. Never edit a released step: append a new one.
_V1 = """
CREATE TABLE results (
    id INTEGER PRIMARY KEY,             -- insertion order; the stable row id in exports
    backbone TEXT NOT NULL,             -- backbone spec or zoo name, as passed to create_backbone
    task TEXT NOT NULL,                 -- task name (its version is part of config_hash)
    dataset TEXT NOT NULL,              -- dataset name the task ran on
    protocol TEXT NOT NULL,             -- evaluation protocol: linear, knn, finetune, detection, ...
    seed INTEGER NOT NULL,              -- seed of everything random in the cell (init, splits, training)
    config_hash TEXT NOT NULL,          -- hash of the fully resolved cell config; never NULL: it is a key
    metric TEXT NOT NULL,               -- metric name; '' on the single row of a failed cell
    value REAL,                         -- finite score; NULL for a failed cell
    higher_is_better INTEGER,           -- 1 / 0, as the task declares; NULL for a failed cell
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT,                         -- traceback or message of a failed cell; NULL when ok
    config_json TEXT NOT NULL,          -- the full resolved config: enough to rerun the cell
    card_json TEXT,                     -- BackboneCard dict: input contract, weights and their digest
    bobench_version TEXT,               -- installed bobench version ('0+unknown' from a bare checkout)
    git_hash TEXT,                      -- HEAD of the bobench checkout, '-dirty' if modified; NULL if none
    library_versions_json TEXT,         -- {distribution: version} of torch, timm, numpy, sklearn, ...
    device TEXT,                        -- e.g. 'cpu: AMD EPYC, 2 threads' or 'cuda:0 NVIDIA H100 80GB HBM3'
    wall_time_s REAL,                   -- wall-clock seconds of the cell (feature extraction included)
    n_train INTEGER,                    -- samples the protocol trained / fit on
    n_test INTEGER,                     -- samples it was scored on
    created_at TEXT NOT NULL            -- UTC ISO-8601 time the row was written
);
"""
_V2 = """
-- v1 had no uniqueness guard: keep only the newest row of each key so the unique index can be built.
DELETE FROM results WHERE id NOT IN (
    SELECT MAX(id) FROM results GROUP BY backbone, task, dataset, protocol, seed, config_hash, metric
);
ALTER TABLE results ADD COLUMN dtype TEXT;             -- compute dtype: float32, bfloat16, ...
ALTER TABLE results ADD COLUMN img_per_s REAL;         -- forward throughput while extracting features
ALTER TABLE results ADD COLUMN peak_mem_mb REAL;       -- peak accelerator (or process) memory, MiB
ALTER TABLE results ADD COLUMN environment_json TEXT;  -- {python, platform, hostname} of the run
CREATE UNIQUE INDEX results_cell_metric
    ON results (backbone, task, dataset, protocol, seed, config_hash, metric);
"""
MIGRATIONS: list[tuple[int, str | Callable[[sqlite3.Connection], None]]] = [(1, _V1), (2, _V2)]
SCHEMA_VERSION = MIGRATIONS[-1][0]

# Column order of ResultStore.results() and exports (ALTER TABLE appended the v2 columns at the end of the
# table in the file, so this order, not the file's, is the contract).
COLUMNS = (
    *("id", "backbone", "task", "dataset", "protocol", "seed", "config_hash", "metric", "value"),
    *("higher_is_better", "status", "error", "config_json", "card_json", "bobench_version", "git_hash"),
    *("library_versions_json", "environment_json", "device", "dtype", "wall_time_s", "img_per_s"),
    *("peak_mem_mb", "n_train", "n_test", "created_at"),
)
# The columns that identify a cell: bobench.store.Cell's fields, in their order.
KEY = ("backbone", "task", "dataset", "protocol", "seed", "config_hash")
# Fixed dtypes of ResultStore.results(), whatever the rows: an all-NULL column would otherwise come back as
# object.
# "string", not "str": under pandas 2, astype("str") turns None into the text "None".
DTYPES = dict.fromkeys(COLUMNS, "string") | dict.fromkeys(("value", "wall_time_s", "img_per_s"), "float64")
DTYPES |= {"peak_mem_mb": "float64", "id": "int64", "seed": "int64", "higher_is_better": "boolean"}
DTYPES |= {"n_train": "Int64", "n_test": "Int64"}


def statements(script: str) -> Iterator[str]:
    """Split a SQL script into complete statements (comments and string literals respected)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    if buffer.strip():
        raise ValueError(f"incomplete SQL statement in migration: {buffer.strip()[:80]!r}")
