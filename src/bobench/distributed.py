"""Multi-process (multi-GPU) training under ``torchrun``: the process group, the launch, lockstep checks.

``bobench run|battle --nproc N`` re-runs its own command line under ``python -m torch.distributed.run
--standalone --nproc_per_node N`` (:func:`launch`). Every process (rank) plans the same cells; trained
cells train on all ranks together (DDP in :class:`~bobench.training.Trainer`, one GPU per rank, the
gloo backend on the CPU); frozen cells run on every rank (the feature cache's lock lets one extract
while the others wait and read; no collectives, so rank 0's outcome is what counts); only rank 0
records, prints and writes the report. A user may also start ``torchrun ... -m bobench run ...``
directly: the ranks behave the same (but exit non-zero when cells failed, which torchrun reports).

**Lockstep.** A rank that leaves the sequence of collectives while others wait in one would hang them
(or, worse, pair unrelated collectives). So every cell's collectives sit between two checks of the
same shape, :func:`agree` (an all-gather of a hash of "which step am I at" and "did it go well"): at
the start of training and at the end of each trained cell. A failure that happens on every rank alike
before training (a dataset error, a bad parameter) reaches the end-of-cell check on all ranks: the
cell is recorded as failed and the battle goes on; so is one on some ranks only after training (scoring
the test set), with that rank's error. A failure on some ranks only before training meets
the others' start-of-training check: the hashes differ, every rank sees it and the launch ends. A
failure inside training (:func:`lockstep`) may leave others inside a collective: that rank ends the
launch at once (:class:`RankFailure`; rank 0 first records the cell as failed) and exits without a
clean shutdown; ``torchrun`` then stops the other ranks. Cells recorded before are kept; the cell
resumes from its last checkpoint when the command is rerun. No rank is left waiting for one that left.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: the launcher asks rank 0 to write its exit code here (``torchrun``'s own code says less)
EXIT_FILE_ENV = "BOBENCH_EXIT_FILE"


class DistributedError(RuntimeError):
    """A multi-process run cannot start as asked (a usage error: exit code 2)."""


class RankFailure(RuntimeError):
    """The ranks are no longer in lockstep; the launch must end (exit code 1)."""


_failure: list[str] = []  # why this rank left lockstep (set by lockstep(), read by the runner)


def world() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from ``torchrun``'s environment; ``(0, 0, 1)`` outside it."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def _group() -> Any:
    """``torch.distributed`` when a process group is initialised, else None (never imports torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    dist = _group()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def is_main() -> bool:
    """True on rank 0 (of the process group, else of ``torchrun``'s environment) and outside torchrun."""
    dist = _group()
    return dist.get_rank() == 0 if dist is not None else world()[0] == 0


def _check_device(device: str, nproc: int, local_rank: int = 0) -> bool:
    """Whether ``nproc`` ranks per machine run on CUDA (one GPU each); raises when they cannot run.

    Raises:
        DistributedError: one pinned GPU for several ranks, MPS, or fewer GPUs than ranks, with the fix.
    """
    import torch

    if device.startswith("cuda:"):
        raise DistributedError(
            f"--device {device} pins one GPU, but each of the {nproc} processes needs its own: give "
            "--device cuda (process i uses cuda:i; choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    mps = getattr(torch.backends, "mps", None)
    if device == "mps" or (device == "auto" and not cuda and mps is not None and mps.is_available()):
        raise DistributedError("multi-process training does not run on MPS: use --device cpu or --nproc 1")
    if cuda:
        n = torch.cuda.device_count()
        if n == 0:
            raise DistributedError(f"--device {device}, but torch sees no CUDA GPU: use --device cpu")
        if max(nproc, local_rank + 1) > n:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
            raise DistributedError(
                f"--nproc {nproc} needs {nproc} GPUs (one per process), but torch sees {n}{where}: "
                f"use --nproc {n} or fewer, or make more GPUs visible"
            )
    return cuda


def init_from_env(device: str = "auto") -> str:
    """Join ``torchrun``'s process group (when ``WORLD_SIZE`` > 1) and return this rank's device.

    nccl with ``cuda:<LOCAL_RANK>`` on GPUs (``device`` ``cuda``, or ``auto`` with CUDA), gloo with
    ``device`` unchanged on the CPU. A group that already exists is kept. Outside torchrun: ``device``.

    Raises:
        DistributedError: the device cannot host this many ranks (see :func:`launch`), with the fix.
    """
    _, local_rank, size = world()
    if size <= 1:
        return device
    import torch
    import torch.distributed as dist

    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    cuda = _check_device(device, local_size, local_rank)
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        extra = {"device_id": torch.device("cuda", local_rank)} if cuda else {}
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", **extra)
    return f"cuda:{local_rank}" if cuda else device


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if (dist := _group()) is not None:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if any (not a collective: ranks may leave at different times)."""
    if (dist := _group()) is not None:
        import gc

        # DDP wrappers sit in reference cycles and hold the group: collected at exit, its gloo threads
        # would touch tensors while the interpreter is torn down (SIGABRT). Free them now.
        gc.collect()
        dist.destroy_process_group()


def _device() -> Any:
    import torch

    dist = _group()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    dist = _group()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (what the others pass is ignored)."""
    dist = _group()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(step: str, ok: bool = True) -> list[bool]:
    """A lockstep check: every rank's ``ok`` at ``step``, which every rank must reach in the same order.

    One all-gather of ``(hash of step, ok)``: a rank that reached another step (because it failed
    before this one) pairs its check with this one, so every rank sees the mismatch; none waits for a
    check that never comes, and no unrelated collectives pair up.

    Raises:
        RankFailure: the ranks are at different steps (named), on every rank.
    """
    dist = _group()
    if dist is None or dist.get_world_size() == 1:
        return [ok]
    import torch

    key = int.from_bytes(hashlib.sha256(step.encode()).digest()[:7], "little")
    mine = torch.tensor([key, int(ok)], dtype=torch.int64, device=_device())
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    if len({int(t[0]) for t in out}) > 1:
        steps = gather_objects(step)  # every rank saw the mismatch: this second gather pairs up
        where = "; ".join(f"rank {r}: {s}" for r, s in enumerate(steps))
        _failure.append(f"ranks out of step ({where})")
        raise RankFailure(
            f"the ranks are out of step ({where}): a rank failed before a step the others reached; "
            "stopping every rank (its error is above)"
        )
    return [bool(t[1]) for t in out]


@contextmanager
def lockstep(step: str) -> Iterator[None]:
    """Collectives follow: check that every rank is at ``step`` (:func:`agree`), and remember any
    exception raised inside, which leaves this rank out of step (:func:`out_of_step`)."""
    agree(step)
    try:
        yield
    except BaseException as exc:
        _failure.append(f"{step}: {type(exc).__name__}: {exc}")
        raise


def out_of_step() -> str | None:
    """Why this rank left lockstep (an error inside :func:`lockstep`), or None; it must not go on."""
    return _failure[-1] if _failure else None


def reset_out_of_step() -> None:
    """Forget :func:`out_of_step` (for a process that handled the failure on every rank: tests)."""
    _failure.clear()


def mean_across(values: Sequence[float]) -> list[float]:
    """The element-wise mean of ``values`` over the ranks (same length on every rank)."""
    dist = _group()
    if dist is None:
        return list(values)
    import torch

    t = torch.tensor(list(values), dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def sync_buffers(model: Any) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, so every rank holds one model."""
    dist = _group()
    if dist is None:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def sync_batchnorm(model: Any) -> Any:
    """``model`` with its BatchNorm layers made SyncBatchNorm, in place (done once: a second call keeps them).

    timm's converter keeps its fused norm + activation layers (``BatchNormAct2d`` becomes
    ``SyncBatchNormAct``); parameters, buffers and state-dict keys stay the same objects and names.
    """
    import torch

    if isinstance(model, torch.nn.modules.batchnorm._BatchNorm):
        raise ValueError("sync_batchnorm converts the BatchNorm layers inside a model, not a lone layer")
    if not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):  # timm's would redo them
        from timm.layers import convert_sync_batchnorm

        convert_sync_batchnorm(model)  # replaces the children in place
    return model


def wrap_ddp(model: Any, device: Any) -> Any:
    """``model`` in ``DistributedDataParallel``; on CUDA its BatchNorm layers become SyncBatchNorm first.

    SyncBatchNorm normalises with the statistics of the micro-batches of all ranks together. torch's
    SyncBatchNorm runs on GPUs only, so on the CPU (gloo) BatchNorm stays per rank: statistics of each
    rank's share, as in data parallel training without sync. ``find_unused_parameters``: backbones often
    hold parameters their embedding does not use (a mask token, an unused head), which plain DDP refuses.
    """
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def default_workers() -> int:
    """DataLoader workers when none are given: one per spare core of this rank's share, at most 8."""
    share = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return min(8, max(0, share - 1))


def loader_workers(requested: int | None, device_type: str) -> int:
    """DataLoader workers for a pass whose model runs on ``device_type``: ``requested`` when given; else
    none on the CPU and :func:`default_workers` on an accelerator.

    On the CPU there is no spare core: torch's intra-op threads already take every one, and a worker
    process decoding beside them preempts one of those threads, which stalls the others at the end of
    each parallel region. Loading in the main process between forwards was faster on every point
    measured (BENCHMARKS P1: 1.1-1.3x on 2 cores, for model-bound ViTs and for photos that cost more to
    decode than to embed). The worker count never changes the numbers: extraction and evaluation read in
    order, and training seeds each sample's augmentation by its index.
    """
    if requested is not None:
        return requested
    return 0 if device_type == "cpu" else default_workers()


def launch(nproc: int, argv: Sequence[str], device: str = "auto") -> int:
    """Run ``python -m bobench ARGV`` as ``nproc`` ranks under torchrun; return rank 0's exit code.

    Raises:
        DistributedError: ``device`` cannot host ``nproc`` ranks (e.g. more ranks than GPUs), with the fix.
    """
    if device != "cpu":
        _check_device(device, nproc)
    with tempfile.TemporaryDirectory(prefix="bobench-launch-") as tmp:
        exit_file = Path(tmp) / "exit-code"
        env = {**os.environ, EXIT_FILE_ENV: str(exit_file)}
        # torchrun would set 1 thread per rank (and print a banner): give each rank its share instead
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        proc = subprocess.run([*cmd, "-m", "bobench", *argv], env=env, check=False)
        text = exit_file.read_text().strip() if exit_file.is_file() else ""
    if not text:  # rank 0 ended without an exit code: torchrun stopped it (another rank failed)
        print(
            "error: a rank failed (its error is above) and torchrun stopped the others; the cells recorded "
            "so far are kept, and rerunning the same command resumes the rest",
            file=sys.stderr,
        )
        return proc.returncode or 1
    if proc.returncode and int(text) == 0:
        print(f"error: rank 0 finished, but torchrun exited {proc.returncode} (see above)", file=sys.stderr)
        return 1
    return int(text)


def exit_code(rc: int, completed: bool) -> int:
    """The exit code of a ``bobench`` process; in a launched rank, also hand ``rc`` to :func:`launch`.

    A launched rank whose command completed exits 0 whatever ``rc`` says (rank 0 wrote it for the
    launcher): a non-zero exit makes torchrun stop every rank, which only an error should. A rank that
    failed leaves at once, without the clean shutdown that could wait on ranks stuck in a collective.
    """
    rank, _, size = world()
    path = os.environ.get(EXIT_FILE_ENV) if size > 1 else None
    if path is not None and rank == 0:
        Path(path).write_text(str(rc))
    if size > 1 and not completed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc or 1)
    shutdown()
    return 0 if path is not None else rc
