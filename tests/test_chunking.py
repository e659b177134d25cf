"""The chunked forward pass: order, out-of-memory back-off, the CPU's pixel rule, and the opt-in search on
known timings.

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
from bobench.features import ExtractOptions, FeatureSet, FeatureStore
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
        run = self.forward = ChunkedForward(batch_size, "cpu", chunk="search", clock=self.clock, **kw)
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
        "chunk_from": "search",
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
def test_the_search_starts_at_the_pixel_rules_size(batch_size: int, image: int, first: int) -> None:
    cost = CostModel(dict.fromkeys(range(1, 65), 1.0))
    run = cost.run(batch_size, batches=2, image=image)
    assert list(run.trials) == [first]


@pytest.mark.parametrize(
    ("batch_size", "image", "chunk"),
    [(64, 224, 4), (64, 128, 16), (64, 64, 64), (64, 96, 16), (48, 32, 48), (7, 2000, 2), (1, 224, 1)],
)
def test_the_cpus_default_chunk_is_the_pixel_rule_and_nothing_is_timed(
    batch_size: int, image: int, chunk: int
) -> None:
    # 2**18 px: 5.2 images of 224 px -> 4; 16 of 128; 64 of 64; 28.4 of 96 -> 16; a batch that fits is
    # whole, however odd; a huge image still gets 2 (the floor), a batch of 1 stays 1
    def clock() -> float:
        raise AssertionError("the default rule read the clock")

    run = ChunkedForward(batch_size, "cpu", clock=clock)
    x = torch.randn(batch_size, 3, image, image)
    for _ in range(3):
        outs = run(x, lambda c: c.mean(dim=(1, 2, 3)))
        assert [len(o) for o in outs] == [len(c) for c in x.split(chunk)]
    torch.testing.assert_close(torch.cat(outs), x.mean(dim=(1, 2, 3)))
    assert run.stats() == {"forward_chunk": chunk, "chunk_from": "pixels", "chunk_trials_ms_per_image": {}}
    hwc = ChunkedForward(batch_size, "cpu", clock=clock)  # the input cache's uint8 [B, H, W, 3] batches
    hwc(torch.zeros(batch_size, image, image, 3, dtype=torch.uint8), lambda c: c)
    assert hwc.size == chunk


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
    run = cost.forward = ChunkedForward(32, "cpu", chunk="search", clock=cost.clock)
    for n in (32, 5, 32, 32):  # warm-up, a partial batch (untimed), trials at 4 and 8
        run(torch.zeros(n, 3, 224, 224), cost)
    assert list(run.trials) == [4, 8] and run.tuning
    assert run.stats()["forward_chunk"] == 8  # the best so far, not the 16 that was never run


@pytest.mark.parametrize(
    ("device", "chunk", "size", "source"),
    [
        ("cpu", 3, 3, "fixed"),
        ("cuda", None, 32, "batch"),
        ("cuda", "search", 32, "batch"),
        ("cpu", 99, 32, "fixed"),
    ],
)
def test_fixed_chunks_and_accelerators_are_not_tuned(device: str, chunk, size: int, source: str) -> None:
    run = ChunkedForward(32, device, chunk=chunk)
    x = torch.arange(32.0).reshape(32, 1, 1, 1)
    for _ in range(4):
        outs = run(x, lambda c: c + 1)
        assert [len(o) for o in outs] == [len(c) for c in x.split(size)]
        assert torch.equal(torch.cat(outs), x + 1)
    assert not run.tuning and run.trials == {}
    assert run.stats() == {"forward_chunk": size, "chunk_from": source, "chunk_trials_ms_per_image": {}}


def test_out_of_memory_halves_the_chunk_and_caps_the_search() -> None:
    seen: list[int] = []

    def limited(chunk: torch.Tensor) -> torch.Tensor:
        seen.append(len(chunk))
        if len(chunk) > 4:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {len(chunk)} images")
        return chunk.sum(dim=(1, 2, 3))

    run = ChunkedForward(16, "cpu", chunk="search")
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


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4", "Search"])
def test_bad_forward_chunk_is_refused(bad) -> None:
    with pytest.raises(ValueError, match="forward_chunk must be None, 'search' or an integer >= 1"):
        RunOptions(forward_chunk=bad)
    with pytest.raises(ValueError, match="forward_chunk must be None, 'search' or an integer >= 1"):
        ChunkedForward(16, "cpu", chunk=bad)


def test_extraction_records_its_chunk_and_is_reproducible_bit_for_bit(tmp_path: Path) -> None:
    bb = create_backbone("mobilenetv2_100.tv_in1k")
    ds = load_dataset("digits", split="val")  # 360 images: 11 full batches of 32
    base = dict(device="cpu", batch_size=32, image_size=128, num_workers=0, progress=False)

    def extract(name: str, **kw) -> FeatureSet:
        return FeatureStore(tmp_path / name).get_or_extract(bb, ds, ExtractOptions(**base, **kw))

    first, again = extract("first"), extract("again")
    whole, search = extract("whole", forward_chunk=32), extract("search", forward_chunk="search")
    assert first.key == whole.key == search.key  # how a batch is cut is not part of the key
    assert (first.stats["forward_chunk"], first.stats["chunk_from"]) == (16, "pixels")  # 2**18 px: 16 at 128
    assert (whole.stats["forward_chunk"], whole.stats["chunk_from"]) == (32, "fixed")
    trials = [int(k) for k in search.stats["chunk_trials_ms_per_image"]]
    assert (
        search.stats["chunk_from"] == "search" and trials[0] == 16 and search.stats["forward_chunk"] in trials
    )
    np.testing.assert_array_equal(again.load()[0], first.load()[0])  # the rule is the same on every run
    for other in (whole, search):  # other cuts: at most rounding apart (module docstring)
        np.testing.assert_allclose(other.load()[0], first.load()[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(other.load()[1], first.load()[1])
