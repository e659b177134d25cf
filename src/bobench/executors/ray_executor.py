"""The Ray executor: one Ray task per backbone, on a local Ray instance or a cluster.

Contract (``execute(groups, *, address=None, max_retries=1, num_cpus=None, num_gpus_per_group=None)``):

* **Connection.** If Ray is not initialised in this process, ``ray.init(address=address)`` is called
  (``None`` starts a local instance, ``"auto"`` joins a running cluster) with the dashboard off and
  Ray's logging quiet (worker logs stay in Ray's session log directory); Ray is shut down at the end
  only if this function started it. An already initialised Ray (a notebook, a test fixture) is used
  as it is and left running.
* **One task per group.** Each :class:`~bobench.cells.WorkGroup` (one backbone: built once, each
  dataset extracted once) runs as one *streaming generator* task (``num_returns="streaming"``)
  executing :func:`~bobench.groups.run_group`, which yields each cell's outcome as it finishes; so the
  driver records cells as they complete, and a killed battle loses at most the cells in flight.
* **Worker environment.** Every task carries ``runtime_env={"env_vars": …}`` with the driver's
  ``BOBENCH_*``, Hugging Face (``HF_*``…), torch cache and thread-count variables, and a
  ``PYTHONPATH`` made of the driver's own import path (minus the interpreter's and site-packages
  directories) followed by its ``PYTHONPATH``, so ``module:callable`` backbones the driver can import
  (e.g. a ``user_models.py`` beside the battle) import in the workers too. The variables are set per
  task, so they apply whether or not this function started Ray.
* **Resources.** A task declares ``num_cpus`` CPUs (default 1) and, unless ``num_gpus_per_group``
  says otherwise (fractions allowed, e.g. 0.5 to share a GPU between two groups), one GPU when the
  group's extraction device asks for one: ``cuda`` / ``cuda:N``, or ``auto`` while the cluster has
  GPUs; otherwise none, and Ray hides the GPUs from the task, so ``auto`` resolves to the CPU there.
  Ray chooses which GPU a task gets, so a ``cuda:N`` index is dropped (``cuda``) when Ray assigns one.
  A ``cuda`` device on a cluster without GPUs raises :class:`ValueError` before anything runs (the
  task could never be scheduled); pass ``num_gpus_per_group`` to wait for an autoscaler anyway.
* **Order.** Outcomes are yielded in completion order across groups: :func:`ray.wait` over the
  groups' generators returns whichever has its next outcome ready first.
* **Single writer.** This executor only yields; the driver alone writes the results store.
* **Failures.** A cell's own failure is a ``failed`` outcome from :func:`~bobench.groups.run_group`,
  as with the local executor. A task that raises or whose worker dies (``WorkerCrashedError``,
  ``RayTaskError``, a lost node…) is resubmitted up to ``max_retries`` times with only the cells of its
  group that have not produced an outcome yet; after the last attempt each of those cells gets a
  ``failed`` outcome naming the Ray error and the number of attempts. A cell that came back is never
  run again nor yielded twice. Ray's own task retries are off, so retries are counted here alone.
* **Interruption.** When the consumer stops early (``KeyboardInterrupt`` in the driver, an exception,
  or the generator being closed), every task still owing cells is cancelled with ``ray.cancel(force=True)``
  (one whose cells all came back is left to return),
  Ray is shut down if this function started it, and the exception propagates; the store then holds
  only completed cells, and a rerun resumes from them.

Ray is optional (``pip install "bobench[ray]"``); without it :func:`execute` raises an
:class:`ImportError` saying so. The module keeps no global state beyond what Ray itself keeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import site
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bobench.cells import CellOutcome, PlannedCell, WorkGroup
from bobench.groups import run_group

# Variables that change what a worker computes or where it finds models and caches.
_ENV_PREFIXES = ("BOBENCH_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TIMM_", "TORCH_")
_ENV_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "XDG_CACHE_HOME", "CUBLAS_WORKSPACE_CONFIG")
# ray.wait wakes up this often, so a Ctrl-C in the driver is handled promptly.
_POLL_S = 0.5


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            'the ray executor needs Ray, which is not installed: pip install "bobench[ray]"'
        ) from exc
    return ray


def _driver_import_path() -> list[str]:
    """The driver's import directories that a worker would not have by itself, then its PYTHONPATH."""
    system = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    site_dirs = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    paths: list[str] = []
    for entry in sys.path:
        path = Path(entry or os.getcwd()).resolve()  # "" is the driver's working directory
        if not path.is_dir() or path in site_dirs or any(path.is_relative_to(s) for s in system):
            continue
        paths.append(str(path))
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return list(dict.fromkeys(paths))


def worker_env() -> dict[str, str]:
    """The ``env_vars`` each group's task runs with: the driver's relevant variables (see module doc)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES}
    path = _driver_import_path()
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    return env


def gpus_for(group: WorkGroup, cluster_gpus: float, override: float | None = None) -> float:
    """GPUs a group's task declares: ``override`` if given, else 1 when its device wants a GPU.

    Raises:
        ValueError: the device is ``cuda…``, no override is given and the cluster has no GPU.
    """
    if override is not None:
        return override
    device = group.options.device
    if device.startswith("cuda"):
        if cluster_gpus <= 0:
            raise ValueError(
                f"extraction device {device!r} needs a GPU but the Ray cluster has none; use --device "
                "auto or cpu, or pass num_gpus_per_group to wait for GPU nodes to join"
            )
        return 1
    return 1 if device == "auto" and cluster_gpus > 0 else 0


def _run_group_in_worker(group: WorkGroup) -> Iterator[CellOutcome]:
    """The task body: module-level, so workers import it from bobench rather than unpickle it."""
    yield from run_group(group)


def _crash_note(ray: Any, exc: BaseException) -> str:
    ex = ray.exceptions
    crashed = (ex.WorkerCrashedError, ex.NodeDiedError, ex.ActorDiedError, ex.OutOfMemoryError)
    if isinstance(exc, crashed):
        return "the Ray worker running it died"
    if isinstance(exc, ray.exceptions.RayTaskError):
        return "its Ray task raised"
    return "Ray failed"


@dataclasses.dataclass
class _Attempt:
    """One submitted task: its group, which attempt it is, and the cells still owed an outcome."""

    group: WorkGroup
    number: int
    remaining: dict[Any, PlannedCell]


def execute(
    groups: list[WorkGroup],
    *,
    address: str | None = None,
    max_retries: int = 1,
    num_cpus: float | None = None,
    num_gpus_per_group: float | None = None,
) -> Iterator[CellOutcome]:
    """Run each group as a Ray task, yielding cell outcomes in completion order (see module doc).

    Args:
        groups: the work groups (one per backbone) from the runner.
        address: Ray address to connect to when Ray is not initialised yet: ``None`` starts a local
            instance, ``"auto"`` joins a running cluster.
        max_retries: how many times a group whose task raises or whose worker dies is resubmitted
            with its remaining cells, before those cells are recorded as failed.
        num_cpus: CPUs each group's task declares (default 1).
        num_gpus_per_group: GPUs each group's task declares, overriding the device rule.

    Returns:
        An iterator of :class:`~bobench.cells.CellOutcome`, exactly one per cell of ``groups``.

    Raises:
        ImportError: Ray is not installed (the message says ``pip install "bobench[ray]"``).
        ValueError: ``max_retries`` is negative; (while iterating) a ``cuda`` device on a cluster
            without GPUs.
    """
    ray = _import_ray()  # here, not in the generator, so a missing Ray fails at the call
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    return _execute(ray, list(groups), address, max_retries, num_cpus, num_gpus_per_group)


def _execute(
    ray: Any,
    groups: list[WorkGroup],
    address: str | None,
    max_retries: int,
    num_cpus: float | None,
    num_gpus_per_group: float | None,
) -> Iterator[CellOutcome]:
    if not groups:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    active: dict[Any, _Attempt] = {}
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        env = worker_env()
        # Ray's own retries are off: it would rerun the whole group, cells already returned included
        task = ray.remote(num_returns="streaming", max_retries=0, retry_exceptions=False)(
            _run_group_in_worker
        )

        def submit(group: WorkGroup, number: int) -> None:
            n_gpus = gpus_for(group, gpus, num_gpus_per_group)
            if n_gpus and group.options.device.startswith("cuda:"):
                # Ray picks the GPU and shows the task only that one, so an index would point nowhere
                group = dataclasses.replace(group, options=group.options.replace(device="cuda"))
            gen = task.options(
                num_cpus=1 if num_cpus is None else num_cpus,
                num_gpus=n_gpus,
                runtime_env={"env_vars": env},
                name=f"bobench:{group.backbone}",
            ).remote(group)
            active[gen] = _Attempt(group, number, {pc.cell: pc for pc in group.cells})

        for group in groups:
            gpus_for(group, gpus, num_gpus_per_group)  # refuse an unschedulable battle before any work
        for group in groups:
            submit(group, 1)
        while active:
            ready, _ = ray.wait(list(active), num_returns=1, timeout=_POLL_S)
            for gen in ready:
                attempt = active[gen]
                try:
                    out = ray.get(next(gen))
                except StopIteration:
                    del active[gen]
                    # run_group yields for every cell; this only guards against a silent early end
                    yield from _give_up(attempt, "its Ray task ended without an outcome for it")
                    continue
                except ray.exceptions.RayError as exc:
                    del active[gen]
                    if attempt.number <= max_retries and attempt.remaining:
                        cells = tuple(attempt.remaining.values())
                        submit(dataclasses.replace(attempt.group, cells=cells), attempt.number + 1)
                    else:
                        why = f"{_crash_note(ray, exc)} ({type(exc).__name__}): {exc}"
                        yield from _give_up(attempt, why)
                    continue
                if attempt.remaining.pop(out.planned.cell, None) is not None:  # never yield a cell twice
                    yield out
    finally:
        # reached with tasks outstanding only when the consumer stopped early (Ctrl-C, an error, close)
        for gen, attempt in active.items():
            if not attempt.remaining:
                # every cell came back: the task is only returning. Force-cancelling a task as its reply
                # arrives aborts the driver in Ray 2.60 (task_manager.cc "Tried to complete task that was
                # not pending"), which took a whole test session down with it; it ends on its own.
                continue
            # a task that already finished, or whose worker is already gone, has nothing left to stop
            with contextlib.suppress(Exception):
                ray.cancel(gen, force=True)
        if started:
            ray.shutdown()


def _give_up(attempt: _Attempt, why: str) -> Iterator[CellOutcome]:
    """A failed outcome for each cell still owed one, naming the failure and the attempts made."""
    n = attempt.number
    for pc in attempt.remaining.values():
        yield CellOutcome(
            pc,
            "failed",
            error=f"backbone {pc.backbone}: {why}\n(gave up after {n} attempt{'s' * (n > 1)} of this group)",
        )
