"""Run options: *how* a cell runs (device, precision, batch size, workers), never *what* it computes.

They are chosen once at the edge (CLI flags, ``run_battle(options=...)``) and travel as one frozen
object to feature extraction and to every protocol. They are deliberately not task parameters: a
task's ``config_hash`` (and so a cell's identity in the results store) must not change when the same
task runs on another device or with another batch size. What was actually used (the resolved device
and precision) is recorded with every result instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bobench.chunking import check_chunk


@dataclass(frozen=True)
class RunOptions:
    """Where and how cells run.

    Attributes:
        device: ``auto`` | ``cpu`` | ``cuda[:N]`` | ``mps``; ``auto`` picks CUDA, then MPS, then the CPU.
        precision: ``auto`` (mixed precision on GPUs, fp32 on the CPU) | ``fp32`` | ``fp16`` | ``bf16``.
        batch_size: images per batch (frozen extraction runs it through the model in ``forward_chunk``s).
        num_workers: DataLoader workers (None: none on the CPU, where the main process loads between
            forwards; one per spare core, at most 8, on an accelerator:
            :func:`bobench.distributed.loader_workers`).
        channels_last: None lets the backbone decide (CNNs: yes).
        progress: show progress bars (only ever on a terminal).
        compile: run trained models through ``torch.compile`` (opt-in).
        checkpoint_minutes: a training run also checkpoints inside an epoch when this many minutes
            have passed since the last checkpoint (None: after every epoch only).
        input_cache: frozen-feature extraction reads images decoded and resized once per dataset and
            resize/crop (:mod:`bobench.input_cache`, under the feature cache), shared by every backbone
            that resizes alike; the features are the same. Opt-in: it stores the resized images on disk.
        forward_chunk: images per model call in frozen extraction (features and maps,
            :mod:`bobench.chunking`): None takes cache-sized chunks on the CPU (at most 2^18 input pixels,
            e.g. 4 images at 224 px) and the whole batch on accelerators; an integer fixes it; ``"search"``
            times the first batches on the CPU to find the fastest (the features may then differ from
            run to run in the last bits). Halved on out-of-memory in every case.

    Example:
        >>> RunOptions(device="cpu").replace(batch_size=32).batch_size
        32
    """

    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    num_workers: int | None = None
    channels_last: bool | None = None
    progress: bool = True
    compile: bool = False
    checkpoint_minutes: float | None = 10.0
    input_cache: bool = False
    forward_chunk: int | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.num_workers is not None and (
            isinstance(self.num_workers, bool)
            or not isinstance(self.num_workers, int)
            or self.num_workers < 0
        ):
            raise ValueError(f"num_workers must be None or an integer >= 0, got {self.num_workers!r}")
        check_chunk(self.forward_chunk)

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with ``changes`` applied (the object itself is frozen)."""
        return replace(self, **changes)
