"""Frozen forward passes in chunks: out-of-memory back-off on every device, a measured chunk size on the CPU.

A loader batch goes through the model in chunks of ``size`` images. Two things set ``size``:

- **Out of memory** (any device): the batch is retried at half the chunk, down to one image.
- **The CPU's caches.** On a CPU a chunk smaller than the loader's batch often runs faster per image,
  because a few images' activations stay in the last-level cache between layers: on a 2-core AMD EPYC
  (32 MiB L3) at 224 px and batch 64, MobileNetV2 ran 4.7x faster per image in chunks of 4, ResNet-50
  1.9x, ViT-Ti/16 1.2x in chunks of 16; at 64 px the whole batch was best (BENCHMARKS.md, P1). The best
  size depends on the model, the image size and the machine, so it is *measured* rather than guessed, as
  ``torch.backends.cudnn.benchmark`` measures convolution algorithms. The search starts from the size
  whose chunk holds about ``_START_PIXELS`` input pixels (4 images at 224 px, 16 at 128, 64 at 64: where
  the optimum lay on that machine). The first full batch runs at it untimed (warm-up); each following full
  batch is timed at one size: the start, then doubling while the time per image stays within ``_GAIN`` of
  the fastest so far (on a tie the larger chunk wins: fewer calls, and less exposed to a busy machine), or,
  if the first doubling was clearly slower (or the start is the whole batch), halving while that clearly
  pays. The size kept is used for the
  rest of the pass. Every trial batch is real work whose output is kept, so tuning costs only the slower
  trials, and a search from near the optimum costs two or three batches.

A chunk's size is not part of any cache key: it changes at most the floating-point rounding of an image's
features, as a batch size does (a kernel may block differently for another number of images). On the 2-core
EPYC, chunks of 2, 4 and 8 at 224 px gave features bit-equal to a batch of 16 for MobileNetV2,
EfficientNet-B0 and -Lite0, ResNet-50, ConvNeXt-T, ViT-Ti and -S and Swin-T; but MobileNetV2 at 64 px in
chunks of 2 differed by up to 8e-6 (absolute, on features of about 0.1), and chunks of 1 differed for the
depthwise networks at both sizes. So two extractions whose searches keep different sizes may differ in the
last bits; a fixed ``forward_chunk`` makes repeated runs bit-equal. The search never goes below
``_MIN_SEARCH`` images. The size used and the trials are recorded in the extraction's stats.
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
#: input pixels in the chunk the search starts from (see the module docstring)
_START_PIXELS = 2**18
#: the search never tries fewer images than this: one image at a time was never the fastest where measured,
#: and it changed the features' last bits most often (module docstring)
_MIN_SEARCH = 2


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an accelerator out-of-memory error (retry with a smaller batch)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class ChunkedForward:
    """Runs each batch through a function in chunks, backing off on out-of-memory and, on the CPU, tuning
    the chunk size by timing real batches (see the module docstring).

    Args:
        batch_size: the loader's batch size (the largest chunk).
        device_type: ``torch.device.type`` of the model; only ``"cpu"`` is tuned (an accelerator's work is
            asynchronous, so host timings would not measure it).
        chunk: a fixed chunk size (no tuning; still halved on out-of-memory); None tunes on the CPU and
            uses the whole batch elsewhere.
        clock: seconds, monotonic (a parameter so the tuning rule can be tested on known timings).

    Example:
        >>> run = ChunkedForward(64, "cpu")
        >>> feats = torch.cat(run(x, model.embed))  # x: one loader batch
    """

    def __init__(
        self,
        batch_size: int,
        device_type: str,
        chunk: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"forward_chunk must be None or an integer >= 1, got {chunk!r}")
        self.batch_size = batch_size
        self.device_type = device_type
        self._clock = clock
        self._size = min(chunk, batch_size) if chunk is not None else batch_size
        self._cap = batch_size  # out-of-memory ceiling
        self.tuning = chunk is None and device_type == "cpu" and batch_size > _MIN_SEARCH
        self._phase = "start"  # start -> warm-up -> up -> (down) -> done
        self._start = batch_size
        self._chosen = batch_size  # the size kept so far
        #: seconds per image measured at each trial size, in trial order
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

        if self.tuning and self._phase == "start":  # the first batch: the warm-up, at the starting size
            pixels = int(x.shape[-1]) * int(x.shape[-2]) if x.dim() >= 3 else 1
            fits = _START_PIXELS // pixels
            start = self.batch_size if self.batch_size <= fits else _power_of_two_at_most(fits)
            self._size = self._start = max(start, _MIN_SEARCH)
            self._phase = "warm-up"
        while True:
            size = self.size
            t0 = self._clock()
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
            if self._chosen == self._start and self._start // 2 >= _MIN_SEARCH:
                self._phase, self._size = "down", self._start // 2
                return
        elif per_image < self.trials[self._chosen] * (1 - _GAIN):  # down: shrinking must clearly pay
            self._chosen = size
            if size // 2 >= _MIN_SEARCH:
                self._size = size // 2
                return
        self._phase, self._size, self.tuning = "done", self._chosen, False

    def stats(self) -> dict[str, Any]:
        """What to record: the chunk size chosen (the best so far if the pass ended while tuning), whether
        any trial ran, and the trials (ms per image)."""
        chosen = self._chosen if self.tuning and self.trials else self.size
        return {
            "forward_chunk": chosen,
            "chunk_tuned": bool(self.trials),
            "chunk_trials_ms_per_image": {str(k): round(v * 1e3, 4) for k, v in self.trials.items()},
        }


def _power_of_two_at_most(n: int) -> int:
    """The largest power of two <= ``n`` (1 for ``n`` < 2)."""
    return 1 << max(0, int(n).bit_length() - 1)
