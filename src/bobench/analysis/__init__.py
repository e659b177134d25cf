"""Rank backbones the Battle of the Backbones way: pure functions over the long results table.

Pipeline (each step a plain DataFrame, its provenance in ``df.attrs``)::

    matrix = score_matrix(store.results())   # backbone × setting, mean over seeds, NaN where missing
    z = zscores(matrix)                      # per setting, over the backbones that have it
    ranking = rank(z)                        # mean z per task type, then over task types
    cis = bootstrap(store.results())         # paired bootstrap CIs of overall score and rank

BoB (Goldblum et al. 2023) z-scores each setting across backbones, averages z within each task type and
then across task types. Here a *setting* is ``"<task>:<metric>"``; z uses the population standard
deviation (``ddof=0``, as :func:`scipy.stats.zscore`); lower-is-better metrics are sign-flipped so a
higher z is always better. Missing cells stay NaN everywhere: a backbone is ranked on what it has and
flagged, never scored as if a missing cell were present. The CLI's :func:`leaderboard` and the HTML
report both order backbones by :func:`rank`.

Modules, one noun each (import from here; the split is for reading, not an API):

- :mod:`~bobench.analysis.rows`: which rows of the results table count; task configs and cards.
- :mod:`~bobench.analysis.scores`: :func:`score_matrix`, :func:`zscores`, :func:`rank`.
- :mod:`~bobench.analysis.confidence`: :func:`bootstrap`, :func:`score_ci`.
- :mod:`~bobench.analysis.correlations`: :func:`task_correlations`, :func:`covariate_correlations`.
- :mod:`~bobench.analysis.reference`: BoB's own numbers, :func:`compare_with_reference`.
- :mod:`~bobench.analysis.robustness`: :func:`effective_robustness` (ID vs OOD accuracy).
- :mod:`~bobench.analysis.standings`: the end-of-battle :func:`leaderboard` the CLI prints.

Only I/O: reading the prediction Parquet files named in ``config_json`` (bootstrap) and BoB's reference
CSV (:func:`load_reference`); :func:`leaderboard` reads a :class:`~bobench.store.ResultStore`.
"""

from __future__ import annotations

from bobench.analysis.confidence import bootstrap, score_ci
from bobench.analysis.correlations import BOB_COVARIATE_RHO, covariate_correlations, task_correlations
from bobench.analysis.reference import (
    BOB_RETRIEVAL_MAPPING,
    REFERENCE_DIR,
    compare_with_reference,
    load_reference,
)
from bobench.analysis.robustness import effective_robustness
from bobench.analysis.scores import rank, score_matrix, task_type, zscores
from bobench.analysis.standings import format_leaderboard, leaderboard

__all__ = [
    "BOB_COVARIATE_RHO",
    "BOB_RETRIEVAL_MAPPING",
    "REFERENCE_DIR",
    "bootstrap",
    "compare_with_reference",
    "covariate_correlations",
    "effective_robustness",
    "format_leaderboard",
    "leaderboard",
    "load_reference",
    "rank",
    "score_ci",
    "score_matrix",
    "task_correlations",
    "task_type",
    "zscores",
]
