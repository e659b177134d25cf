"""A learning-rate sweep of a trained protocol: one resumable training run per value, the best on val kept.

Each value trains in its own checkpoint folder (``<checkpoint_dir>/lr<i>``). Once a value's run has
finished, its outcome (best weights, val score, epoch, curve) is saved there as ``done`` and its
per-epoch state deleted, so a killed sweep resumes at the first unfinished value without retraining
the finished ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bobench.checkpoints import Checkpoints
from bobench.training import TrainResult


def lr_sweep(
    lrs: Sequence[float],
    checkpoint_dir: str | Path | None,
    fit: Callable[[float, Checkpoints | None], TrainResult],
) -> tuple[dict[str, Any], dict[str, float | None]]:
    """Run ``fit(lr, checkpoints)`` for every value of ``lrs`` (skipping those already done).

    Returns:
        ``(best, val_by_lr)``: ``best`` the outcome of the value with the highest val score (the first
        on ties; a run without a score ranks last) with keys ``state``, ``score``, ``epoch``,
        ``history``, ``batch_size``, ``img_per_s`` and ``lr``; ``val_by_lr`` every value's best val
        score, keyed ``f"{lr:g}"``.
    """
    val_by_lr: dict[str, float | None] = {}
    best: dict[str, Any] | None = None
    for i, lr in enumerate(lrs):
        folder = Checkpoints(Path(checkpoint_dir) / f"lr{i}") if checkpoint_dir is not None else None
        done = folder.load("done") if folder is not None else None
        if done is None:
            result = fit(lr, folder)
            done = {
                "state": result.best_state, "score": result.best_score, "epoch": result.best_epoch,
                "history": result.history, "batch_size": result.batch_size, "img_per_s": result.img_per_s,
            }  # fmt: skip
            if folder is not None:
                folder.save(done, "done")
                folder.path().unlink(missing_ok=True)  # the per-epoch state is no longer needed
        val_by_lr[f"{lr:g}"] = done["score"]
        if best is None or _rank(done["score"]) > _rank(best["score"]):
            best = {**done, "lr": lr}
    if best is None:
        raise ValueError("an lr sweep needs at least one learning rate")
    return best, val_by_lr


def _rank(score: float | None) -> float:
    return -math.inf if score is None else score
