"""Executors decide where work groups run; nothing else in a battle changes with them.

An executor is a callable ``(groups: list[WorkGroup]) -> Iterator[CellOutcome]``. Outcomes are
yielded back to the driver, which alone writes the results store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from bobench.registry import Registry

EXECUTORS = Registry("executor")
EXECUTORS.register("local", "bobench.executors.local:execute")


def get_executor(name: str) -> Callable[[list], Iterator]:
    """The executor called ``name`` (``local``)."""
    return EXECUTORS.load(name)
