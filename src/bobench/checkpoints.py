"""Atomic, resumable training state on disk: what a killed training run resumes from.

Files are written to a temporary name, fsynced and renamed (a kill leaves the previous checkpoint
whole), and read back with ``torch.load(weights_only=True)``: a checkpoint never runs pickled code.
Under DDP only rank 0 writes (the ranks hold the same state) and every rank reads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

#: bumped when the layout of a saved state changes; a checkpoint of another version is ignored
CHECKPOINT_VERSION = 1


class Checkpoints:
    """Atomic, resumable training state in one folder (``<name>.pt`` files).

    Args:
        folder: where the files live (created on first save).
        writer: whether this process writes; None (default): rank 0 of the process group does (any
            process without one). Every rank reads.
    """

    def __init__(self, folder: str | os.PathLike, *, writer: bool | None = None) -> None:
        self.folder = Path(folder)
        self._writer = writer

    @property
    def writer(self) -> bool:
        """Whether :meth:`save` and :meth:`clear` act in this process (asked when they run)."""
        from bobench.distributed import is_main

        return is_main() if self._writer is None else self._writer

    def path(self, name: str = "last") -> Path:
        return self.folder / f"{name}.pt"

    def load(self, name: str = "last") -> dict[str, Any] | None:
        """The saved state ``name``, or None. Never runs pickled code (``weights_only=True``)."""
        path = self.path(name)
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("version") != CHECKPOINT_VERSION:
            return None  # written by another layout: start afresh rather than misread it
        return state

    def save(self, state: dict[str, Any], name: str = "last") -> None:
        """Write ``state`` to a temporary file, fsync it and rename it over ``name`` (never half-written)."""
        if not self.writer:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(name)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save({**state, "version": CHECKPOINT_VERSION}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def clear(self) -> None:
        """Delete every checkpoint in the folder (after the cell is recorded)."""
        if not self.writer or not self.folder.is_dir():
            return
        shutil.rmtree(self.folder, ignore_errors=True)
