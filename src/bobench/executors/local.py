"""The default executor: every group in this process, one after another."""

from __future__ import annotations

from collections.abc import Iterator

from bobench.cells import CellOutcome, WorkGroup
from bobench.groups import run_group


def execute(groups: list[WorkGroup], **options: object) -> Iterator[CellOutcome]:
    """Run ``groups`` in order in the driver process, yielding each cell's outcome as it finishes.

    Raises:
        ValueError: any option (those belong to other executors, e.g. ``address`` for ``ray``).
    """
    if options:
        raise ValueError(f"the local executor takes no options, got {sorted(options)}; use --executor ray")
    for group in groups:
        yield from run_group(group)
