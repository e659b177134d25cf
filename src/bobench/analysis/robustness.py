"""Effective robustness: how much better a backbone does out of distribution than its in-distribution
accuracy predicts (Taori et al., 2020, "Measuring Robustness to Natural Distribution Shifts in Image
Classification"; Miller et al., 2021, "Accuracy on the Line").

Across models, OOD accuracy is close to a linear function of ID accuracy once both are logit-transformed.
Fit that line over every backbone of a results table, then a backbone's *effective robustness* is its OOD
accuracy minus the line's prediction at its ID accuracy: 0 on the line, > 0 above it (more robust than
its ID accuracy explains). imagenet-testbed fits the line over its reference models; here it is fitted
over the backbones of one task under the same probe protocol, whatever they are, so the numbers compare
those backbones with each other (add or remove one and the line moves).

Pure functions over the long results table of :meth:`bobench.store.ResultStore.results` (or its CSV /
Parquet export): columns ``backbone``, ``task``, ``metric``, ``value`` and, if present, ``status``.
Accuracies are fractions in ``[0, 1]``, as every bobench protocol records them.

Example:
    >>> er = effective_robustness(store.results(), "imagenet-ood")   # after `bobench battle`
    >>> er[["backbone", "id", "ood", "effective_robustness"]]; er.attrs["a"], er.attrs["r2"]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CLIP", "effective_robustness"]

#: Accuracies are clipped to ``[CLIP, 1 - CLIP]`` before the logit: 0 % or 100 % would be -inf / inf.
CLIP = 1e-4
_TRANSFORMS = ("logit", "linear")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, CLIP, 1 - CLIP)
    return np.log(p) - np.log1p(-p)


def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def effective_robustness(
    df: pd.DataFrame,
    task: str,
    id_metric: str = "top1",
    ood_metric: str = "top1@ood=mean",
    transform: str = "logit",
) -> pd.DataFrame:
    """Fit ``f(ood) = a f(id) + b`` over all backbones of ``task`` and score each against the line.

    Args:
        df: long results table (``backbone``, ``task``, ``metric``, ``value``; rows whose ``status`` is
            not ``ok`` are ignored, and so are those of a cell's older configs, see
            :func:`~bobench.analysis.rows.newest_config`). Several rows of one backbone and metric (seeds)
            are averaged: filter ``df`` first to compare one seed.
        task: the task whose rows are used.
        id_metric, ood_metric: the accuracies on the x and y axes, fractions in ``[0, 1]``.
        transform: ``"logit"`` (``f = logit`` of the accuracy clipped to ``[1e-4, 1 - 1e-4]``, as
            Taori et al.) or ``"linear"`` (``f`` = identity: a plain fit of the raw accuracies).

    Returns:
        One row per backbone having both metrics, by decreasing effective robustness, with columns
        ``backbone``, ``id``, ``ood``, ``ood_predicted`` (the line at ``id``, mapped back to accuracy),
        ``effective_robustness`` (``ood - ood_predicted``, in accuracy units) and, for ``"logit"``,
        ``residual_logit`` (``f(ood) - a f(id) - b``). ``attrs`` holds the fit: ``a``, ``b``, ``n`` (the
        backbones fitted), ``r2`` (coefficient of determination in the transformed space; NaN if every
        ``f(ood)`` is equal), ``transform``, ``task``, ``id_metric``, ``ood_metric`` and ``dropped`` (the
        backbones of ``task`` lacking one of the two metrics).

    Raises:
        ValueError: an unknown transform, missing columns, accuracies outside ``[0, 1]`` (percentages?),
            fewer than 3 backbones with both metrics, or all of them at the same ID accuracy.
    """
    import pandas as pd

    from bobench.analysis.rows import newest_config

    if transform not in _TRANSFORMS:
        raise ValueError(f"transform must be one of {_TRANSFORMS}, got {transform!r}")
    missing = {"backbone", "task", "metric", "value"} - set(df.columns)
    if missing:
        raise ValueError(f"the results table lacks column(s) {sorted(missing)}")
    df = df[newest_config(df)]  # a task's runs before a version bump are not averaged in
    rows = df[(df["task"] == task) & df["metric"].isin([id_metric, ood_metric])]
    if "status" in rows.columns:
        rows = rows[rows["status"] == "ok"]
    wide = rows.pivot_table(index="backbone", columns="metric", values="value", aggfunc="mean")
    wide = wide.reindex(columns=[id_metric, ood_metric])
    complete = wide.dropna()
    dropped = sorted(set(df.loc[df["task"] == task, "backbone"]) - set(complete.index))
    if len(complete) < 3:
        raise ValueError(
            f"effective robustness needs at least 3 backbones with both {id_metric!r} and {ood_metric!r} "
            f"on task {task!r}; found {len(complete)}"
        )
    acc_id = complete[id_metric].to_numpy(dtype=np.float64)
    acc_ood = complete[ood_metric].to_numpy(dtype=np.float64)
    if not (np.all((acc_id >= 0) & (acc_id <= 1)) and np.all((acc_ood >= 0) & (acc_ood <= 1))):
        raise ValueError(f"{id_metric!r} and {ood_metric!r} must be fractions in [0, 1] (not percentages)")
    f, f_inv = (_logit, _expit) if transform == "logit" else (np.asarray, np.asarray)
    x, y = f(acc_id), f(acc_ood)
    if np.ptp(x) == 0:
        raise ValueError(f"all {len(x)} backbones have the same {id_metric!r}: no line to fit")
    # Least squares of y on [x, 1]: the fit imagenet-testbed draws (np.polyfit(x, y, 1) gives the same).
    (a, b), *_ = np.linalg.lstsq(np.column_stack([x, np.ones_like(x)]), y, rcond=None)
    fitted = a * x + b
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - fitted) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    predicted = f_inv(fitted)
    out = pd.DataFrame(
        {
            "backbone": complete.index.astype(str),
            "id": acc_id,
            "ood": acc_ood,
            "ood_predicted": predicted,
            "effective_robustness": acc_ood - predicted,
        }
    )
    if transform == "logit":
        out["residual_logit"] = y - fitted
    out = out.sort_values(["effective_robustness", "backbone"], ascending=[False, True], ignore_index=True)
    out.attrs.update(
        a=float(a),
        b=float(b),
        n=len(x),
        r2=r2,
        transform=transform,
        task=task,
        id_metric=id_metric,
        ood_metric=ood_metric,
        dropped=dropped,
    )
    return out
