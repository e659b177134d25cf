"""Frozen forward passes in chunks: out-of-memory back-off on every device, cache-sized chunks on the CPU.

A loader batch goes through the model in chunks of ``size`` images. Three things set ``size``:

- **Out of memory** (any device): the batch is retried at half the chunk, down to one image.
- **The CPU's caches** (the default on the CPU). A chunk smaller than the loader's batch often runs faster
  per image, because a few images' activations stay in the last-level cache between layers: on a 2-core
  AMD EPYC (32 MiB L3) at 224 px, MobileNetV2 ran 2.9x faster per image in chunks of 4 than in batches of
  32, EfficientNet-B0 2.3x (chunks of 8), ResNet-50 1.3x (4), a ViT-Ti/16 within noise; at 128 px the
  fastest chunk held 16 images, at 64 px the whole batch of 64 (BENCHMARKS.md, P1). The optimum sat near a
  fixed number of input pixels, so the default chunk is the largest power of two of images holding at most
  ``CHUNK_PIXELS`` (2^18) pixels, or the whole batch when it fits, and never fewer than ``_MIN_CHUNK``
  images: 4 at 224 px, 16 at 128 px. It is a rule, not a measurement, so it is the same on every run: the
  features are reproducible bit for bit, and a resumed extraction matches an uninterrupted one.
- **A measured size** (``chunk="search"``, opt-in, CPU only), as ``torch.backends.cudnn.benchmark``
  measures convolution algorithms, for a machine where the rule's size is not the fastest. From the rule's
  size, the first full batch warms up untimed; each following full batch is timed at one size: the start,
  then doubling while the time per image stays within ``_GAIN`` of the fastest so far (on a tie the larger
  chunk wins: fewer calls, less exposed to a busy machine), or, if the first doubling was clearly slower (or
  the start is the whole batch), halving while that clearly pays, never below ``_MIN_CHUNK``. The size kept
  serves the rest of the pass. Trial batches are real work whose output is kept. The price: which size wins
  depends on timings, so two runs may keep different sizes, and their features may then differ in the last
  bits (below).

A chunk's size is not part of any cache key: it changes at most the floating-point rounding of an image's
features, as a batch size does (a kernel may block differently for another number of images). On the 2-core
EPYC, chunks of 2, 4 and 8 at 224 px gave features bit-equal to a batch of 16 for MobileNetV2,
EfficientNet-B0 and -Lite0, ResNet-50, ConvNeXt-T, ViT-Ti and -S and Swin-T; MobileNetV2 at 64 px in chunks
of 2 differed by up to 8e-6 (absolute, on features of about 0.1), and chunks of 1 differed for the
depthwise networks at both sizes. The size used, where it came from and any trials are recorded in the
extraction's stats. Accelerators run the whole batch (their work is asynchronous, and their caches are not
the bottleneck).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

#: noise margin on the time per image: a doubling is kept unless it is slower than the fastest so far by
#: more than this fraction, a halving only if it is faster by at least this fraction
_GAIN = 0.03
#: input pixels a default CPU chunk holds at most (see the module docstring)
CHUNK_PIXELS = 2**18
#: no chunk rule or search goes below this many images: one image at a time was never the fastest where
#: measured, and it changed the features' last bits most often (module docstring)
_MIN_CHUNK = 2


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an accelerator out-of-memory error (retry with a smaller batch)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class ChunkedForward:
    """Runs each batch through a function in chunks (see the module docstring): the CPU's cache-sized
    chunks by default, a fixed size, or a measured one; halved on out-of-memory on every device.

    Args:
        batch_size: the loader's batch size (the largest chunk).
        device_type: ``torch.device.type`` of the model; only ``"cpu"`` gets cache-sized or measured chunks.
        chunk: None for the default (the pixel rule on the CPU, the whole batch elsewhere); an integer for
            that size; ``"search"`` to measure it on the CPU (the whole batch elsewhere).
        clock: seconds, monotonic (a parameter so the search can be tested on known timings).

    Example:
        >>> run = ChunkedForward(64, "cpu")
        >>> feats = torch.cat(run(x, model.embed))  # x: one loader batch
    """

    def __init__(
        self,
        batch_size: int,
        device_type: str,
        chunk: int | str | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        check_chunk(chunk)
        self.batch_size = batch_size
        self.device_type = device_type
        self._clock = clock
        cpu = device_type == "cpu"
        self.source = (
            "fixed" if isinstance(chunk, int) else "batch" if not cpu else "search" if chunk else "pixels"
        )
        self._size = min(chunk, batch_size) if isinstance(chunk, int) else batch_size
        self._cap = batch_size  # out-of-memory ceiling
        self._pending = self.source in ("pixels", "search")  # the size waits for the first batch's shape
        self.tuning = False
        self._phase = "warm-up"  # warm-up -> up -> (down) -> done
        self._start = self._chosen = batch_size  # the search's first size; the size kept so far
        #: seconds per image measured at each trial size, in trial order (``"search"`` only)
        self.trials: dict[int, float] = {}

    @property
    def size(self) -> int:
        """The chunk size the next batch runs at."""
        return max(1, min(self._size, self._cap))

    def __call__(self, x: torch.Tensor, fn: Callable[[torch.Tensor], T]) -> list[T]:
        """``fn`` of each consecutive chunk of ``x`` (along dim 0), in order.

        On out-of-memory the whole batch is retried at half the chunk (CUDA's cache is emptied first);
        other errors, and out-of-memory at one image, propagate.
        """
        import torch

        if self._pending:  # the first batch: its image size sets the rule's chunk (the search's start)
            self._pending = False
            self._size = self._start = self._chosen = pixel_chunk(self.batch_size, x)
            self.tuning = self.source == "search" and self.batch_size > _MIN_CHUNK
        while True:
            size = self.size
            t0 = self._clock() if self.tuning else 0.0
            try:
                outs = [fn(chunk) for chunk in x.split(size)]
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_oom(exc) or size == 1:
                    raise
                self._cap = max(1, size // 2)  # back off and retry this batch
                if self.device_type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if self.tuning and len(x) == self.batch_size:
                self._observe(size, (self._clock() - t0) / len(x))
            return outs

    def _observe(self, size: int, per_image: float) -> None:
        """One full batch ran at ``size`` in ``per_image`` seconds an image: set the next trial's size."""
        if self._phase == "warm-up":  # untimed: the first trial runs at the same size on the next batch
            self._phase = "up"
            return
        self.trials[size] = per_image
        if self._phase == "up":
            # as fast as the fastest so far, within noise: keep it, since a larger chunk means fewer calls
            if per_image <= min(self.trials.values()) * (1 + _GAIN):
                self._chosen = size
                largest = min(self.batch_size, self._cap)  # out of memory caps the growth
                if size < largest:
                    self._size = min(2 * size, largest)
                    return
            # growing did not pay, or could not (the start was the whole batch): try shrinking
            if self._chosen == self._start and self._start // 2 >= _MIN_CHUNK:
                self._phase, self._size = "down", self._start // 2
                return
        elif per_image < self.trials[self._chosen] * (1 - _GAIN):  # down: shrinking must clearly pay
            self._chosen = size
            if size // 2 >= _MIN_CHUNK:
                self._size = size // 2
                return
        self._phase, self._size, self.tuning = "done", self._chosen, False

    def stats(self) -> dict[str, Any]:
        """What to record: the chunk size (the best so far if the pass ended while searching), where it came
        from (``pixels``: the CPU rule; ``search``; ``fixed``; ``batch``: an accelerator's whole batch), and
        the search's trials in ms per image (empty otherwise)."""
        chosen = self._chosen if self.tuning and self.trials else self.size
        return {
            "forward_chunk": chosen,
            "chunk_from": self.source,
            "chunk_trials_ms_per_image": {str(k): round(v * 1e3, 4) for k, v in self.trials.items()},
        }


def check_chunk(chunk: object) -> None:
    """Raise ValueError unless ``chunk`` is a valid ``forward_chunk``: None, ``"search"`` or an int >= 1."""
    if chunk is None or chunk == "search":
        return
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"forward_chunk must be None, 'search' or an integer >= 1, got {chunk!r}")


def pixel_chunk(batch_size: int, x: torch.Tensor) -> int:
    """The CPU's default chunk for batches shaped like ``x``: the whole batch if it holds at most
    ``CHUNK_PIXELS`` RGB pixels (3 input values each, whatever the layout), else the largest power of two of
    images that does, at least ``_MIN_CHUNK`` (never more than the batch)."""
    # counted in input values, 3 a pixel, so that any layout counts alike: the input cache's uint8 batches
    # are [B, H, W, 3] until the device permutes them
    values = max(1, x[0].numel()) if len(x) else 1
    fits = 3 * CHUNK_PIXELS // values
    if batch_size <= fits:
        return batch_size
    return min(batch_size, max(_power_of_two_at_most(fits), _MIN_CHUNK))


def _power_of_two_at_most(n: int) -> int:
    """The largest power of two <= ``n`` (1 for ``n`` < 2)."""
    return 1 << max(0, int(n).bit_length() - 1)
