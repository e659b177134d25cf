"""Executors decide where work groups run; nothing else in a battle changes with them.

An executor is a callable ``(groups: list[WorkGroup], **options) -> Iterator[CellOutcome]``. Outcomes
are yielded back to the driver, which alone writes the results store. ``local`` runs every group in
this process; ``ray`` runs each group as a Ray task on a local or remote cluster (``bobench[ray]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from bobench.registry import Registry

EXECUTORS = Registry("executor")
EXECUTORS.register("local", "bobench.executors.local:execute")
EXECUTORS.register("ray", "bobench.executors.ray_executor:execute")


def get_executor(name: str) -> Callable[[list], Iterator]:
    """The executor called ``name`` (``local`` or ``ray``)."""
    return EXECUTORS.load(name)
