"""The chunked forward pass: order, out-of-memory back-off, and the CPU chunk search on known timings.

The search is tested with a clock that the "model" advances by a known cost per image for each chunk size,
so each test knows which size must win; the real timings it meets on a machine are BENCHMARKS.md's (P1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bobench import create_backbone, load_dataset
from bobench.chunking import ChunkedForward
from bobench.features import ExtractOptions, FeatureStore
from bobench.options import RunOptions


class CostModel:
    """A clock and a forward function: a chunk of ``n`` images at size ``s`` costs ``n * ms[s]`` ms."""

    def __init__(self, ms: dict[int, float]) -> None:
        self.ms = ms
        self.now = 0.0
        self.calls: list[int] = []

    def clock(self) -> float:
        return self.now

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(chunk))
        self.now += len(chunk) * self.ms[self.forward.size] / 1e3  # the size this call runs at
        return chunk * 2

    def run(self, batch_size: int, batches: int, image: int = 224, **kw) -> ChunkedForward:
        """``batches`` full batches of ``image`` px through a ChunkedForward timed by this model."""
        run = self.forward = ChunkedForward(batch_size, "cpu", clock=self.clock, **kw)
        for _ in range(batches):
            x = torch.zeros(batch_size, 3, image, image)
            assert torch.equal(torch.cat(run(x, self)), x * 2)
        return run


def test_search_halves_from_the_start_when_growing_does_not_pay() -> None:
    # a depthwise CNN's shape (MobileNetV2 on the 2-core EPYC): fastest at 2 images; 224 px starts at 4
    cost = CostModel({2: 7.8, 4: 10.0, 8: 12.0, 16: 15.0, 32: 29.0})
    run = cost.run(32, batches=8)
    assert list(run.trials) == [4, 8, 2]  # warm-up at 4 untimed; 8 clearly slower, so down to 2; never 1
    assert run.size == 2 and not run.tuning
    assert run.stats() == {
        "forward_chunk": 2,
        "chunk_tuned": True,
        "chunk_trials_ms_per_image": {"4": 10.0, "8": 12.0, "2": 7.8},
    }
    assert cost.calls[-16:] == [2] * 16  # the batches after the search run at the size kept


def test_halving_stops_when_it_stops_paying() -> None:
    cost = CostModel({4: 7.9, 8: 8.0, 16: 9.5, 32: 12.0, 64: 20.0})
    run = cost.run(64, batches=6, image=128)  # 2**18 px hold 16 images of 128 px
    assert list(run.trials) == [16, 32, 8, 4] and run.size == 8  # 4 is within 3 % of 8: not a clear gain


@pytest.mark.parametrize(
    ("batch_size", "image", "first"), [(3, 32, 3), (48, 32, 48), (48, 96, 16), (7, 2000, 2)]
)
def test_the_search_starts_at_the_whole_batch_when_it_fits(batch_size: int, image: int, first: int) -> None:
    cost = CostModel(dict.fromkeys(range(1, 65), 1.0))
    run = cost.run(batch_size, batches=2, image=image)
    assert list(run.trials) == [first]  # a non-power-of-two batch that fits is tried whole; never below 2


def test_search_grows_through_ties_to_the_larger_chunk() -> None:
    # a ViT's flat shape: every size within 3 % of the fastest, so the largest (fewest calls) is kept
    cost = CostModel({4: 16.6, 8: 16.3, 16: 16.2, 32: 16.5, 64: 18.9})
    run = cost.run(32, batches=6)
    assert list(run.trials) == [4, 8, 16, 32] and run.size == 32


def test_search_stops_growing_at_the_first_clear_loss() -> None:
    cost = CostModel({4: 20.0, 8: 15.0, 16: 14.0, 32: 16.0})
    run = cost.run(32, batches=6)
    assert list(run.trials) == [4, 8, 16, 32] and run.size == 16  # 32 is 14 % slower than 16


def test_small_images_start_at_the_whole_batch_and_shrinking_must_pay() -> None:
    cost = CostModel({64: 0.36, 32: 0.42})  # MobileNetV2 at 64 px: the whole batch is best
    run = cost.run(64, batches=5, image=64)  # 2**18 px hold 64 images of 64 px
    assert list(run.trials) == [64, 32] and run.size == 64


def test_partial_batches_are_not_timed_and_an_unfinished_search_reports_its_best() -> None:
    cost = CostModel({4: 10.0, 8: 8.0, 16: 9.0})
    run = cost.forward = ChunkedForward(32, "cpu", clock=cost.clock)
    for n in (32, 5, 32, 32):  # warm-up, a partial batch (untimed), trials at 4 and 8
        run(torch.zeros(n, 3, 224, 224), cost)
    assert list(run.trials) == [4, 8] and run.tuning
    assert run.stats()["forward_chunk"] == 8  # the best so far, not the 16 that was never run


@pytest.mark.parametrize(("device", "chunk", "size"), [("cpu", 3, 3), ("cuda", None, 32), ("cpu", 99, 32)])
def test_fixed_chunks_and_accelerators_are_not_tuned(device: str, chunk: int | None, size: int) -> None:
    run = ChunkedForward(32, device, chunk=chunk)
    x = torch.arange(32.0).reshape(32, 1, 1, 1)
    for _ in range(4):
        outs = run(x, lambda c: c + 1)
        assert [len(o) for o in outs] == [len(c) for c in x.split(size)]
        assert torch.equal(torch.cat(outs), x + 1)
    assert not run.tuning and run.trials == {} and run.stats()["forward_chunk"] == size
    assert run.stats()["chunk_tuned"] is False


def test_out_of_memory_halves_the_chunk_and_caps_the_search() -> None:
    seen: list[int] = []

    def limited(chunk: torch.Tensor) -> torch.Tensor:
        seen.append(len(chunk))
        if len(chunk) > 4:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {len(chunk)} images")
        return chunk.sum(dim=(1, 2, 3))

    run = ChunkedForward(16, "cpu")
    x = torch.randn(16, 3, 32, 32)  # 32 px: the search starts at the whole batch
    outs = run(x, limited)
    assert seen[:2] == [16, 8] and run.size == 4
    torch.testing.assert_close(torch.cat(outs), x.sum(dim=(1, 2, 3)))
    for _ in range(6):  # the search never asks for more than the cap
        run(x, limited)
    assert set(run.trials) == {4} and not run.tuning and run.size == 4


def test_errors_that_are_not_out_of_memory_propagate_at_once() -> None:
    calls = []

    def broken(chunk: torch.Tensor) -> torch.Tensor:
        calls.append(len(chunk))
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        ChunkedForward(16, "cpu")(torch.zeros(16, 3, 8, 8), broken)
    assert calls == [16]


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_bad_forward_chunk_is_refused(bad) -> None:
    with pytest.raises(ValueError, match="forward_chunk must be None or an integer >= 1"):
        RunOptions(forward_chunk=bad)
    with pytest.raises(ValueError, match="forward_chunk must be None or an integer >= 1"):
        ChunkedForward(16, "cpu", chunk=bad)


def test_extraction_records_its_chunking_and_the_chunk_does_not_change_the_features(tmp_path: Path) -> None:
    bb = create_backbone("mobilenetv2_100.tv_in1k")
    ds = load_dataset("digits", split="val")  # 360 images: 22 full batches of 16
    base = dict(device="cpu", batch_size=16, image_size=64, num_workers=0, progress=False)
    tuned = FeatureStore(tmp_path / "tuned").get_or_extract(bb, ds, ExtractOptions(**base))
    fixed = FeatureStore(tmp_path / "fixed").get_or_extract(bb, ds, ExtractOptions(**base, forward_chunk=4))
    assert tuned.key == fixed.key  # how the batch is cut is not part of the key
    stats = tuned.manifest["stats"]
    trials = [int(k) for k in stats["chunk_trials_ms_per_image"]]
    assert stats["chunk_tuned"] is True and stats["forward_chunk"] in trials
    assert trials[:2] == [16, 8]  # 64 px: the search starts at the whole batch, then tries half
    assert (fixed.manifest["stats"]["forward_chunk"], fixed.manifest["stats"]["chunk_tuned"]) == (4, False)
    # at most rounding apart (up to 8e-6 measured here, on features of about 0.1; module docstring)
    np.testing.assert_allclose(tuned.load()[0], fixed.load()[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(tuned.load()[1], fixed.load()[1])
