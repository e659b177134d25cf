"""One work group: every pending cell of one backbone, run wherever an executor puts it."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from bobench.cells import CellOutcome, PlannedCell, WorkGroup, error_text, failed


def run_group(group: WorkGroup) -> Iterator[CellOutcome]:
    """Run every cell of one backbone; never raises for a cell's failure.

    Trained cells (:mod:`bobench.trained`) each build their own backbone. For the frozen cells the
    backbone is built once; a random-init control (``card.pretrained`` False) is built once per
    seed with that seed as its init seed, so seeds of a control differ in their initialisation as the
    store says they do. A failing build fails exactly the cells that needed it. Runs in the driver
    (local executor) or in a worker (Ray).
    """
    from bobench.backbones import create_backbone
    from bobench.frozen import run_frozen
    from bobench.protocols import protocol_kind
    from bobench.trained import run_trained

    frozen = [pc for pc in group.cells if protocol_kind(pc.task.protocol) == "frozen"]
    for pc in group.cells:
        if protocol_kind(pc.task.protocol) == "trained":
            yield run_trained(pc, group)  # a fresh backbone per trained cell: training changes it
    if not frozen:
        return
    by_seed: dict[int, list[PlannedCell]] = {}
    for pc in frozen:
        by_seed.setdefault(pc.seed, []).append(pc)
    seeds = list(by_seed)
    t0 = time.perf_counter()
    try:
        backbone = create_backbone(group.backbone, init_seed=seeds[0])
    except Exception as exc:
        yield from _build_failed(group.backbone, frozen, exc)
        return
    if backbone.card.pretrained or len(seeds) == 1:
        yield from run_frozen(backbone, frozen, group, build_s=time.perf_counter() - t0)
        return
    # a random-init control: one build per seed, each cell on the network its own seed initialised
    yield from run_frozen(backbone, by_seed[seeds[0]], group, build_s=time.perf_counter() - t0)
    del backbone
    for seed in seeds[1:]:
        t0 = time.perf_counter()
        try:
            backbone = create_backbone(group.backbone, init_seed=seed)
        except Exception as exc:
            yield from _build_failed(group.backbone, by_seed[seed], exc)
            continue
        yield from run_frozen(backbone, by_seed[seed], group, build_s=time.perf_counter() - t0)
        del backbone


def _build_failed(name: str, cells: Sequence[PlannedCell], exc: BaseException) -> Iterator[CellOutcome]:
    for pc in cells:
        yield failed(pc, f"backbone {name}", f"building backbone {name} failed: {error_text(exc)}")
