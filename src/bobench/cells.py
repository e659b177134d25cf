"""The units of a battle: planned cells, their outcomes, and the work groups executors run.

Shared by the runner (which plans and records), the executors (which decide where groups run) and the
code that runs cells (:mod:`bobench.groups`, :mod:`bobench.frozen`).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

from bobench.metrics import Metric
from bobench.options import RunOptions
from bobench.store import Cell
from bobench.task import TaskConfig


@dataclass(frozen=True)
class PlannedCell:
    """One unit of work: a backbone, a task and a seed, with its store identity."""

    backbone: str
    task: TaskConfig
    seed: int
    cell: Cell
    config: dict[str, Any]


@dataclass
class CellOutcome:
    """What running one cell produced; the driver turns it into store rows.

    ``cause`` names what failed (``backbone NAME``, ``dataset SPEC``, ``task NAME``, ``preflight``) so
    a battle's failures can be reported once per cause rather than once per cell. ``wall_time_s`` is
    the cell's share of the work: the model build and the feature extraction it triggered (charged to
    the first cell that needed them) plus its protocol, so the cells of a battle sum to its wall time.
    """

    planned: PlannedCell
    status: str  # "ok" | "failed"
    metrics: list[Metric] = field(default_factory=list)
    error: str = ""
    cause: str = ""
    card: dict[str, Any] | None = None
    device: str = ""
    dtype: str = ""
    wall_time_s: float | None = None
    img_per_s: float | None = None
    peak_mem_mb: float | None = None
    n_train: int | None = None
    n_test: int | None = None
    predictions: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: a trained cell's checkpoint folder: kept while the cell is unrecorded or failed (a rerun resumes
    #: from it), deleted by the driver once the cell is recorded ok
    checkpoint_dir: str | None = None


@dataclass(frozen=True)
class WorkGroup:
    """All pending cells of one backbone, plus what is needed to run them anywhere."""

    backbone: str
    cells: tuple[PlannedCell, ...]
    options: RunOptions
    cache_dir: str


def error_text(exc: BaseException) -> str:
    """``Type: message`` then the last frames of the traceback (what a failed cell stores)."""
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return f"{type(exc).__name__}: {exc}\n\n{''.join(tb[-6:])}"


def failed(pc: PlannedCell, cause: str, error: str, **fields: Any) -> CellOutcome:
    """A failed outcome of ``pc``; ``cause`` is what failed (see :class:`CellOutcome`)."""
    return CellOutcome(pc, "failed", error=error, cause=cause, **fields)
