"""Errors of finding, verifying and loading weights, in a module of their own.

Every weights reader raises them (:mod:`~bobench.backbones.weights`, :mod:`~bobench.backbones.torchscript`,
:mod:`~bobench.backbones.download`, the converters); keeping them here lets those modules depend on the
errors without depending on one another. :mod:`bobench.backbones.weights` re-exports both, so
``from bobench.backbones.weights import WeightsError`` keeps working.
"""

from __future__ import annotations


class WeightsError(RuntimeError):
    """Weights could not be found, verified or loaded; the message says what to do."""


class WeightsUnavailableError(WeightsError):
    """The weights are not on disk and cannot be downloaded from here."""
