"""BoB's published numbers, shipped in ``bobench/reference``, and where our scores land among them.

:func:`load_reference` reads BoB's retrieval MRR table as a results-like table (so the scoring functions
run on it unchanged); :func:`compare_with_reference` places each of our scores among BoB's backbones on
the same dataset and metric, and next to BoB's own score of the same backbone when its card names it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from bobench.analysis.rows import newest_cards
from bobench.analysis.scores import score_matrix

__all__ = ["BOB_RETRIEVAL_MAPPING", "REFERENCE_DIR", "compare_with_reference", "load_reference"]

#: Built-in BoB retrieval tasks → (dataset, metric) of ``bob_retrieval_mrr.csv``; our metric is ``mrr``.
BOB_RETRIEVAL_MAPPING: dict[str, tuple[str, str]] = {
    "bob-cub200-retrieval": ("CUB200", "MRR"),
    "bob-inat-retrieval": ("iNat", "MRR"),
    "bob-objectnet-retrieval": ("Objectnet", "MRR"),
    "bob-instre-retrieval": ("INSTRE", "MRR"),
    "bob-copydays-retrieval": ("Copydays", "MRR"),
    "bob-gldv2-retrieval": ("google_landmark", "MRR"),
    "bob-roxford5k-retrieval": ("roxford5k", "MRR"),
    "bob-rparis6k-retrieval": ("rparis6k", "MRR"),
}
#: BoB's reference tables, shipped with the package (copied from the project's shared reference). The
#: folder is ``bobench/reference``, beside this subpackage: package data (pyproject's ``reference/*``).
REFERENCE_DIR = Path(__file__).resolve().parent.parent / "reference"


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """BoB's retrieval MRR table (``bob_retrieval_mrr.csv``) as a long, results-like table.

    Args:
        path: the CSV; default ``REFERENCE_DIR / "bob_retrieval_mrr.csv"``, the copy shipped in
            ``bobench/reference``.

    Returns:
        Columns ``backbone``, ``dataset``, ``metric``, ``value``, ``higher_is_better`` (True),
        ``source`` (``"BoB"``), plus ``task`` (= dataset), ``protocol`` (``"retrieval"``), ``seed`` (0)
        and ``status`` (``"ok"``) so that ``score_matrix(ref, metric="all")`` works on it.

    Raises:
        FileNotFoundError: no such file (the message names the path tried).
    """
    file = Path(path) if path is not None else REFERENCE_DIR / "bob_retrieval_mrr.csv"
    if not file.is_file():
        hint = "" if path is not None else "; pass load_reference(path=...) to your copy of it"
        raise FileNotFoundError(f"BoB reference table not found at {file}{hint}")
    ref = pd.read_csv(file, dtype={"backbone": str, "dataset": str, "metric": str, "value": float})
    ref = ref.assign(higher_is_better=True, source="BoB", task=ref["dataset"], protocol="retrieval")
    return ref.assign(seed=0, status="ok")


def compare_with_reference(
    results: pd.DataFrame,
    reference: pd.DataFrame | None = None,
    mapping: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Place each of our scores among BoB's backbones on the same dataset and metric.

    Args:
        results: our results table.
        reference: :func:`load_reference` output (loaded when None).
        mapping: ``{our task: (reference dataset, reference metric[, our metric])}``; our metric
            defaults to the reference metric lower-cased (``MRR`` → ``mrr``). Default
            :data:`BOB_RETRIEVAL_MAPPING`.

    Returns:
        One row per (our backbone, mapped task) with a score: ``backbone``, ``task``, ``dataset``,
        ``metric`` (the reference's), ``value`` (ours, mean over seeds), ``bob_rank`` (1 + BoB backbones
        strictly better), ``bob_n``, ``bob_best``, ``bob_best_value``, ``bob_id`` (our card's
        ``extra["bob_id"]``, missing if none), ``bob_value`` (BoB's own score of that backbone there, NaN if
        none) and ``diff`` (``value - bob_value``: the reproduction gap).

    Example:
        >>> compare_with_reference(results, mapping={"bob-cub200-retrieval": ("CUB200", "MRR")})
    """
    reference = load_reference() if reference is None else reference
    mapping = BOB_RETRIEVAL_MAPPING if mapping is None else mapping
    cards = newest_cards(results)
    rows = []
    for task, spec in mapping.items():
        ref_dataset, ref_metric = spec[0], spec[1]
        ours = spec[2] if len(spec) > 2 else ref_metric.lower()
        matrix = score_matrix(results[(results["task"].astype(object) == task).to_numpy()], [ours])
        ref = reference[
            ((reference["dataset"] == ref_dataset) & (reference["metric"] == ref_metric)).to_numpy()
        ]
        if matrix.empty or ref.empty:
            continue
        higher = bool(ref["higher_is_better"].iloc[0]) if "higher_is_better" in ref else True
        sign = 1.0 if higher else -1.0
        values = ref.set_index("backbone")["value"].astype(float)
        best = (sign * values).idxmax()
        for backbone, value in matrix.iloc[:, 0].dropna().items():
            bob_id = cards.get(str(backbone), {}).get("extra", {}).get("bob_id")
            bob_value = float(values.get(bob_id, math.nan)) if bob_id else math.nan
            rows.append({
                "backbone": backbone, "task": task, "dataset": ref_dataset, "metric": ref_metric,
                "value": float(value), "bob_rank": 1 + int((sign * values > sign * value).sum()),
                "bob_n": len(values), "bob_best": best, "bob_best_value": float(values[best]),
                "bob_id": bob_id, "bob_value": bob_value, "diff": float(value) - bob_value,
            })  # fmt: skip
    cols = ["backbone", "task", "dataset", "metric", "value", "bob_rank", "bob_n", "bob_best"]
    return pd.DataFrame(rows, columns=[*cols, "bob_best_value", "bob_id", "bob_value", "diff"])
