"""The one training loop every trained protocol uses (fine-tuning now; detection and segmentation next).

What it does, so protocols do not: device and precision (autocast; a gradient scaler for fp16), the
effective batch as micro-batches × gradient accumulation × data-parallel ranks, gradient clipping,
channels_last, ``torch.compile`` on request, a progress bar (loss, lr, img/s, ETA), evaluation on val
after every epoch with the best epoch's weights kept, atomic checkpoints, and DDP under ``torchrun``.

**Resumable, bit for bit.** Randomness is counter-based, never carried from one step to the next: the
sample order of epoch ``e`` is a permutation seeded by ``(seed, e)``; each sample's augmentation is
seeded by ``(seed, e, index)`` (:class:`SeededDataset`, so it does not depend on which worker loads
it); each micro-batch's mixup and drop-path draws are seeded by ``(seed, e, micro-batch)``. A
checkpoint (model, optimizer, scheduler, scaler, position, best-so-far, history) written after any
optimizer update therefore resumes to exactly the run that was never interrupted: on the CPU the
final weights are equal bit for bit (tested). Checkpoints are written after every epoch, and inside an
epoch at most every ``RunOptions.checkpoint_minutes``, to a temporary name then renamed, and read back
with ``torch.load(weights_only=True)``.

**Under DDP** (:mod:`bobench.distributed`) rank r of W trains on the r-th W-th of each update's batch
(the same images one process would use for that update) and the gradients are averaged over ranks, so
a model without BatchNorm, dropout, drop path or mixup trains as one process does on the same batch,
up to float summation order (tested). BatchNorm becomes SyncBatchNorm on CUDA and stays per rank on
the CPU; random draws are per rank. Only rank 0 writes checkpoints; every rank resumes from them, also
under another world size or micro-batch. Losses are averaged over ranks; every rank evaluates the whole
val set with rank 0's BatchNorm statistics, and rank 0's score selects the epoch on all of them.

Example:
    >>> trainer = Trainer(model, opt, sched, nn.CrossEntropyLoss(), epochs=3, batch_size=32,
    ...                   options=RunOptions(device="cpu"), seed=0, evaluate=val_top1)
    >>> result = trainer.fit(train_set)     # result.best_state: the weights of the best val epoch
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from bobench import distributed
from bobench.checkpoints import Checkpoints
from bobench.data.errors import worker_errors_unwrapped
from bobench.device import Placement, resolve_placement
from bobench.options import RunOptions
from bobench.seeding import SeededDataset, seed_all, seed_for


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        best_state: CPU copy of the model's state at the epoch with the best val score (the last epoch
            when there is no ``evaluate``).
        best_score: that score (None without ``evaluate``). best_epoch: its 0-based epoch.
        history: one dict per epoch: ``epoch``, ``loss`` (mean train loss), ``lr``, ``val``.
        batch_size: the effective batch used (the requested one, clipped to the train set size).
        img_per_s: training throughput of all ranks over the epochs run here (None when resumed complete).
        resumed_from: ``(epoch, micro-batch)`` a checkpoint resumed at, or None.
    """

    best_state: dict[str, torch.Tensor]
    best_score: float | None
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    batch_size: int = 0
    img_per_s: float | None = None
    resumed_from: tuple[int, int] | None = None


class _Shape(NamedTuple):
    """How one epoch is cut: ``n`` images, ``batch`` per update (over ranks), ``micro`` per forward."""

    n: int
    batch: int
    micro: int
    accum: int
    updates: int


def _micro_batch(per_rank: int, largest: int, multiple: int = 1) -> int:
    """The largest divisor of ``per_rank`` that is at most ``largest`` and a multiple of ``multiple``
    (so accumulation is exact, and mixup gets the even batches it needs)."""
    for m in range(min(per_rank, max(1, largest)), 0, -1):
        if per_rank % m == 0 and m % multiple == 0:
            return m
    return per_rank


def to_device(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    """``obj`` with every tensor inside (tensors, lists, tuples, dicts: a detection batch is a tuple of
    images and a tuple of target dicts) moved to ``device``; 4-d tensors made channels_last on request."""
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        if channels_last and obj.dim() == 4:
            obj = obj.contiguous(memory_format=torch.channels_last)
        return obj
    if isinstance(obj, dict):
        return {k: to_device(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device, channels_last) for v in obj)
    return obj


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model.state_dict()``."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class Trainer:
    """Train ``model`` for ``epochs`` epochs; see the module docstring for the guarantees.

    Args:
        model: the module to train (moved to the run's device).
        optimizer: over ``model``'s parameters.
        scheduler: a timm scheduler (``step_update(num_updates)`` after every optimizer update,
            ``step(epoch)`` after every epoch), a function ``updates_per_epoch -> scheduler`` (the number
            is only known once the train set is), or None.
        loss_fn: ``(outputs, targets) -> scalar loss``; unused when ``forward_loss`` is given.
        epochs: total epochs. batch_size: effective batch (over accumulation and ranks).
        options: device, precision, micro-batch (``batch_size``), workers, channels_last, compile,
            checkpoint_minutes.
        seed: the cell's seed: sample order, augmentation, mixup and drop path derive from it.
        clip_grad: max gradient norm, or None.
        mixup: ``(x, y) -> (x, y)`` applied to each micro-batch (e.g. timm's ``Mixup``), or None.
        train_mode: puts the model in training mode (default ``model.train()``; a frozen backbone keeps
            its BatchNorm statistics by staying in eval).
        evaluate: ``model -> score`` on val after every epoch (higher is better), or None.
        checkpoints: where to checkpoint and resume from, or None.
        checkpoint_every: also checkpoint after every N optimizer updates (tests; None: by time only).
        on_update: called with the number of updates after each one is done and checkpointed.
        description: the progress bar's label.
        forward_loss: ``(net, inputs, targets) -> scalar loss`` for one micro-batch, for models that
            compute their own losses (torchvision's detectors take ``(images, targets)`` in training
            mode and return a dict of losses). Default: ``loss_fn(net(inputs), targets)``.
        collate_fn: the DataLoader's ``collate_fn`` (detection batches are tuples of differently
            sized images and target dicts), or None for the default stacking.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        epochs: int,
        batch_size: int,
        options: RunOptions,
        seed: int,
        clip_grad: float | None = None,
        mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        train_mode: Callable[[nn.Module], None] | None = None,
        evaluate: Callable[[nn.Module], float] | None = None,
        checkpoints: Checkpoints | None = None,
        checkpoint_every: int | None = None,
        on_update: Callable[[int], None] | None = None,
        description: str = "train",
        forward_loss: Callable[[nn.Module, Any, Any], torch.Tensor] | None = None,
        collate_fn: Callable[[list], Any] | None = None,
    ) -> None:
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
        self.model, self.optimizer, self.scheduler, self.loss_fn = model, optimizer, scheduler, loss_fn
        self.epochs, self.batch_size, self.options, self.seed = epochs, batch_size, options, seed
        self.clip_grad, self.mixup, self.evaluate = clip_grad, mixup, evaluate
        self.train_mode = train_mode or (lambda m: m.train())
        self.checkpoints, self.checkpoint_every, self.on_update = checkpoints, checkpoint_every, on_update
        self.description = description
        self.forward_loss = forward_loss or (lambda net, x, y: self.loss_fn(net(x), y))
        self.collate_fn = collate_fn
        self.placement: Placement = resolve_placement(options.device, options.precision)

    # -- state ------------------------------------------------------------------------------------
    def _state(self, position: tuple[int, int], updates: int, best: dict[str, Any], history: list) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": self.scaler.state_dict(),
            "epoch": position[0],
            "micro": position[1],
            "updates": updates,
            "best": best,
            "history": history,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, dataset: Any) -> TrainResult:
        """Train on ``dataset`` (items ``(image tensor, target)``), resuming from a checkpoint if any.

        Under DDP every rank calls it; training starts with a lockstep check
        (:func:`bobench.distributed.lockstep`), and an error inside leaves the rank out of step.

        Raises:
            ValueError: a checkpoint of another seed or batch size is in the folder, or the train set
                is smaller than the number of ranks.
        """
        rank, world = distributed.rank_world()
        n = len(dataset)
        step = world * (2 if self.mixup is not None else 1)  # mixup pairs samples within a micro-batch
        batch = min(self.batch_size, n)
        batch -= batch % step
        if batch < step:
            raise ValueError(f"the train set has {n} images: too few for {world} rank(s) (and mixup's pairs)")
        per_rank = batch // world
        micro = _micro_batch(per_rank, self.options.batch_size, 2 if self.mixup is not None else 1)
        accum = per_rank // micro
        updates_per_epoch = n // batch
        seeded = dataset if isinstance(dataset, SeededDataset) else SeededDataset(dataset, self.seed)
        if self.scheduler is not None and not hasattr(self.scheduler, "step_update"):
            self.scheduler = self.scheduler(updates_per_epoch)
        shape = _Shape(n, batch, micro, accum, updates_per_epoch)
        if world == 1:
            return self._train(seeded, shape, rank, world)
        what = f"{self.description}: seed {self.seed}, {self.epochs} epoch(s), batch {batch}, {n} images"
        with distributed.lockstep(f"training {what}"):
            return self._train(seeded, shape, rank, world)

    def _train(self, seeded: SeededDataset, shape: _Shape, rank: int, world: int) -> TrainResult:
        from bobench.progress import progress_bar

        device = self.placement.device
        n, batch, micro, accum, updates_per_epoch = shape
        per_rank = batch // world
        self.model.to(device)
        channels_last = bool(self.options.channels_last)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.placement.precision == "fp16")
        net: nn.Module = self.model
        if world > 1:  # SyncBatchNorm on CUDA; each rank's gradients are averaged over the ranks
            ddp = net = distributed.wrap_ddp(self.model, device)
        if self.options.compile:
            net = torch.compile(net)

        epoch, start_micro, updates = 0, 0, 0
        best: dict[str, Any] = {"score": None, "epoch": -1, "state": None}
        history: list[dict[str, Any]] = []
        resumed = None
        state = self.checkpoints.load() if self.checkpoints is not None else None
        if state is not None:
            if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
                raise ValueError(
                    f"the checkpoint in {self.checkpoints.folder} is of another run (seed {state['seed']}, "
                    f"batch {state['batch_size']}); delete the folder to start afresh"
                )
            self._restore(state)
            # saved after an update: the position in updates holds under another micro-batch or world size
            start_micro = state["micro"] // state.get("accum", accum) * accum
            epoch, updates = state["epoch"], state["updates"]
            best, history = state["best"], state["history"]
            resumed = (epoch, start_micro)

        t_start, seen = time.perf_counter(), 0
        last_save = time.monotonic()
        while epoch < self.epochs:
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(seed_for(self.seed, "order", epoch))
            )
            order = order[: updates_per_epoch * batch].view(updates_per_epoch, world, per_rank)[:, rank]
            local = order.reshape(-1).tolist()
            seeded.epoch = epoch
            loader = DataLoader(
                Subset(seeded, local[start_micro * micro :]),
                batch_size=micro,
                shuffle=False,
                num_workers=self._workers(),
                pin_memory=device.type == "cuda",
                collate_fn=self.collate_fn,
            )
            self.train_mode(self.model)
            # a resumed epoch keeps the losses of its first part, so its mean is the whole epoch's
            losses = list(state.get("epoch_losses", [])) if state is not None and start_micro else []
            lr = self.optimizer.param_groups[-1]["lr"]
            m = start_micro
            total = updates_per_epoch * accum
            with (
                progress_bar(
                    f"{self.description} epoch {epoch + 1}/{self.epochs}",
                    total=total * micro,
                    enabled=self.options.progress and rank == 0,
                ) as bar,
                worker_errors_unwrapped(),
            ):
                bar.advance(start_micro * micro)
                for x, y in loader:
                    seed_all(seed_for(self.seed, "step", epoch, m, rank), device)  # mixup, drop path
                    x, y = to_device(x, device, channels_last), to_device(y, device)
                    if self.mixup is not None:
                        x, y = self.mixup(x, y)
                    last_micro = (m + 1) % accum == 0
                    sync = ddp.no_sync() if world > 1 and not last_micro else nullcontext()
                    with sync, self.placement.autocast_context():
                        loss = self.forward_loss(net, x, y)
                    self.scaler.scale(loss / accum).backward()
                    # kept on the device: reading it back every step would wait for the GPU
                    losses.append(loss.detach())
                    m += 1
                    seen += len(x)
                    lr = self.optimizer.param_groups[-1]["lr"]
                    # the loss in the bar: every step on the CPU, every 10th on an accelerator
                    note = bar.shown and (device.type == "cpu" or m % 10 == 0)
                    bar.advance(len(x), f"loss {float(losses[-1]):.3f} lr {lr:.2e}" if note else "")
                    if not last_micro:
                        continue
                    if world > 1:  # each micro-batch's loss over all ranks: resumes and logs agree
                        losses[-accum:] = distributed.mean_across([float(v) for v in losses[-accum:]])
                    self._step()
                    updates += 1
                    if self.scheduler is not None:
                        self.scheduler.step_update(num_updates=updates)
                    due = self.checkpoint_every is not None and updates % self.checkpoint_every == 0
                    minutes = self.options.checkpoint_minutes
                    due = due or (minutes is not None and time.monotonic() - last_save > 60 * minutes)
                    if self.checkpoints is not None and due and m < total:
                        state_now = self._state((epoch, m), updates, best, history)
                        losses = [float(v) for v in losses]
                        self.checkpoints.save({**state_now, "accum": accum, "epoch_losses": losses})
                        last_save = time.monotonic()
                    if self.on_update is not None:
                        self.on_update(updates)
            if self.scheduler is not None:
                self.scheduler.step(epoch + 1)
            if world > 1:  # one model on every rank (BatchNorm statistics are rank 0's, as DDP's forward)
                distributed.sync_buffers(self.model)
            score = self.evaluate(self.model) if self.evaluate is not None else None
            if world > 1:  # every rank selects the same epoch, whatever its own evaluation said
                score = distributed.broadcast_object(score)
            record = {
                "epoch": epoch,
                "loss": float(np.mean([float(v) for v in losses])) if losses else None,
                "lr": lr,
                "val": score,
            }
            history.append(record)
            if (
                self.evaluate is None
                or best["score"] is None
                or (score is not None and score > best["score"])
            ):
                best = {"score": score, "epoch": epoch, "state": cpu_state(self.model)}
            epoch, start_micro, state = epoch + 1, 0, None
            if self.checkpoints is not None:
                self.checkpoints.save(self._state((epoch, 0), updates, best, history))
                last_save = time.monotonic()
        wall = time.perf_counter() - t_start
        return TrainResult(
            best_state=best["state"] if best["state"] is not None else cpu_state(self.model),
            best_score=best["score"],
            best_epoch=best["epoch"],
            history=history,
            batch_size=batch,
            img_per_s=seen * world / wall if seen and wall > 0 else None,
            resumed_from=resumed,
        )

    def _step(self) -> None:
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            params: Sequence[torch.Tensor] = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _workers(self) -> int:
        return distributed.loader_workers(self.options.num_workers, self.placement.device.type)


def predict_batches(
    model: nn.Module,
    dataset: Any,
    options: RunOptions,
    *,
    description: str = "eval",
    batch_size: int | None = None,
    collate_fn: Callable[[list], Any] | None = None,
) -> Iterator[tuple[Any, Any]]:
    """``(outputs, targets)`` of ``model`` in eval mode, one batch of ``dataset`` at a time, in order.

    Inputs go to the run's device (channels_last on request) and the model runs under inference mode
    and the run's autocast; outputs stay where the model put them. A DataLoader worker's error comes
    out as the dataset's own (naming the file and the fix). Under DDP every rank predicts the whole of
    ``dataset`` with the plain module (a DDP wrapper is unwrapped: no collectives, so ranks may evaluate
    different sets or stop at will). The model's training mode is restored at the end.
    """
    from bobench.progress import progress_bar

    inner = getattr(model, "_orig_mod", model)  # under torch.compile's wrapper
    if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        model = inner.module
    placement = resolve_placement(options.device, options.precision)
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size or options.batch_size,
        shuffle=False,
        num_workers=distributed.loader_workers(options.num_workers, placement.device.type),
        pin_memory=placement.device.type == "cuda",
        collate_fn=collate_fn,
    )
    try:
        with (
            progress_bar(
                description, total=len(dataset), enabled=options.progress and distributed.is_main()
            ) as bar,
            worker_errors_unwrapped(),
        ):
            for x, y in loader:
                x = to_device(x, placement.device, bool(options.channels_last))
                # inference mode around the call only: a generator must not leave it on for its caller
                with torch.inference_mode(), placement.autocast_context():
                    out = model(x)
                yield out, y
                bar.advance(len(y))  # targets count the images (inputs may be a tuple of parts)
    finally:
        model.train(was_training)


def evaluate_model(
    model: nn.Module, dataset: Any, options: RunOptions, *, description: str = "eval"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs [N, ...] float32 on the CPU, targets [N, ...])`` of ``model`` over ``dataset`` in order
    (see :func:`predict_batches`: DDP, devices, worker errors)."""
    outs, targets = [], []
    for out, y in predict_batches(model, dataset, options, description=description):
        outs.append(out.float().cpu())
        targets.append(y)
    return torch.cat(outs), torch.cat(targets)
