"""Filling the input cache (:mod:`bobench.input_cache`) from the batches of the extraction that decodes them.

On an accelerator the input cache's separate decode-and-resize pass would leave the device idle while the
first backbone waits; instead that backbone's extraction decodes in its own DataLoader workers and
:class:`StreamedBuild` stores each uint8 batch on its way to the device, writing shards in a thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from bobench.files import atomic_save_npy, write_manifest


def shape_error(
    dataset: Any, i: int, shape: tuple[int, ...], first: tuple[int, ...], cached: bool = True
) -> ValueError:
    """The error for image ``i`` of ``dataset``, ``shape`` after the resize and crop where the first was
    ``first``: of the input cache (``cached``), or of one batch of the device-normalised path."""
    if not cached:
        return ValueError(
            f"image {dataset.item_id(i)} is {shape} after the resize and crop, the first of its batch was "
            f"{first}; a batch holds images of one size: use a transform that crops to a fixed size, or "
            "--batch-size 1"
        )
    return ValueError(
        f"input cache: image {dataset.item_id(i)} is {shape} after the resize and crop, the first was "
        f"{first}; the cache stores RGB images of one size (a transform that crops to a fixed size): "
        "extract without --input-cache"
    )


class StreamedBuild:
    """Writes one key's input cache from the uint8 batches of the extraction that decodes them, in order.

    Made by :meth:`bobench.input_cache.InputStore.streamed`, holding the key's lock. :meth:`feeding` wraps the extraction's
    forward so each batch is kept before it goes to the device; a thread writes each shard as it fills
    (atomically, the manifest after each). Used as a context manager around the extraction: a normal exit
    marks the set complete, an error leaves the shards written so far, which the separate pass resumes.
    """

    MAX_PENDING = 2  # shard writes queued before the extraction waits (each ~77 MB at 224 px)

    def __init__(
        self, key: str, fields: dict[str, Any], folder: Path, dataset: Any, lock: FileLock, shard_size: int
    ) -> None:
        self.key, self.folder, self.dataset, self.lock = key, folder, dataset, lock
        self.manifest: dict[str, Any] = {
            "key": key, "key_fields": fields, "n": len(dataset), "shard_size": shard_size,
            "complete": False, "shards": [], "streamed": True,
        }  # fmt: skip
        self.info: dict[str, Any] = {}  # the extraction's record, completed on exit
        self._parts: list[np.ndarray] = []
        self._shard = self._filled = self._seen = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="input-cache-writer")
        self._writes: list[Future] = []
        self._t0 = time.perf_counter()
        folder.mkdir(exist_ok=True)

    def feeding(
        self, forward: Callable[[torch.Tensor], torch.Tensor]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``forward`` that first keeps its (CPU, uint8) batch for the input cache."""

        def fn(batch: torch.Tensor) -> torch.Tensor:
            self.add(batch)
            return forward(batch)

        return fn

    def add(self, batch: torch.Tensor) -> None:
        """Keep the next ``len(batch)`` images (uint8 ``[B, H, W, 3]``, in dataset order)."""
        rows = batch.numpy()  # shares the batch's memory; the writer's concatenate copies it
        shape = self.manifest.setdefault("shape", list(rows.shape[1:]))
        if list(rows.shape[1:]) != shape:
            raise shape_error(self.dataset, self._seen, tuple(rows.shape[1:]), tuple(shape))
        self._seen += len(rows)
        size, n = self.manifest["shard_size"], self.manifest["n"]
        while len(rows):
            shard_len = min((self._shard + 1) * size, n) - self._shard * size
            take = rows[: shard_len - self._filled]
            self._parts.append(take)
            self._filled += len(take)
            rows = rows[len(take) :]
            if self._filled == shard_len:
                while sum(not w.done() for w in self._writes) >= self.MAX_PENDING:
                    next(w for w in self._writes if not w.done()).result()
                self._writes.append(self._writer.submit(self._write, self._shard, self._parts))
                self._shard, self._filled, self._parts = self._shard + 1, 0, []

    def _write(self, shard: int, parts: list[np.ndarray]) -> None:
        atomic_save_npy(self.folder / f"shard-{shard:05d}.npy", np.concatenate(parts))
        self.manifest["shards"] = sorted({*self.manifest["shards"], shard})
        write_manifest(self.folder, self.manifest)

    def __enter__(self) -> StreamedBuild:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            for w in self._writes:
                if exc_type is None:
                    w.result()  # a failed write fails the extraction
                else:
                    w.exception()  # wait; the extraction's own error is the one to raise
            if exc_type is None:
                if self._seen != self.manifest["n"]:
                    raise RuntimeError(f"input cache: saw {self._seen} of {self.manifest['n']} images")
                build_s = time.perf_counter() - self._t0
                self.manifest.update(complete=True, build_s=build_s, resumed_shards=0)
                write_manifest(self.folder, self.manifest)
                self.info.update(shape=self.manifest["shape"], build_s=build_s)
        finally:
            self._writer.shutdown(wait=True)
            self.lock.release()
