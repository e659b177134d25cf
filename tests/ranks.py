"""Start DDP ranks for a test and wait for them, failing (not hanging) if they hang."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def spawn_ranks(fn: Callable[..., Any], args: tuple, nprocs: int = 2) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes and wait for all of them; a rank's
    exception fails the test; ranks still running after 10 minutes are killed and the test fails."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    for _ in range(600):  # only a real hang waits this long (10 minutes)
        if ctx.join(timeout=1):
            return
    for p in ctx.processes:
        p.kill()
    pytest.fail("the ranks hung")
