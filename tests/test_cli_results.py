"""``bobench results``, run as a user runs it: the real CLI in a subprocess, on a real results store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bobench.metrics import Metric
from bobench.store import Cell, ResultStore

BOBENCH = [sys.executable, "-m", "bobench"]


def run(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    proc = subprocess.run([*BOBENCH, *args], capture_output=True, text=True, env=full_env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"bobench {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def test_results_list_failed_shows_each_error_by_its_first_line(tmp_path: Path) -> None:
    """A store with failed cells (one a runner-style message, one a bare traceback) lists them all."""
    db = tmp_path / "r.db"
    config = {"task": {"name": "t", "primary": "top1"}}
    with ResultStore(db) as store:
        store.record(Cell("ok-net", "t", "digits", "knn", 0, "h"), [Metric("top1", 0.9, True)], config=config)
        runner_style = "RuntimeError: CUDA out of memory\n\nTraceback (most recent call last):\n  File a.py"
        store.record_failure(Cell("oom-net", "t", "digits", "knn", 0, "h"), runner_style, config=config)
        try:
            raise ValueError("bad weights file")
        except ValueError as exc:  # stored as its full traceback, whose first line is boilerplate
            store.record_failure(Cell("bad-net", "t", "digits", "knn", 0, "h"), exc, config=config)

    proc = run("results", "list", "--failed", "--db", str(db))
    assert proc.returncode == 0
    assert "2 failed cells" in proc.stdout
    assert "RuntimeError: CUDA out of memory" in proc.stdout and "ValueError: bad weights file" in proc.stdout
    assert "Traceback" not in proc.stdout and "ok-net" not in proc.stdout

    rows = json.loads(run("results", "list", "--failed", "--json", "--db", str(db)).stdout)
    errors = {r["backbone"]: r["error"] for r in rows}
    assert errors == {
        "oom-net": "RuntimeError: CUDA out of memory",
        "bad-net": "ValueError: bad weights file",
    }
