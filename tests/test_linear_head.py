"""The linear segmentation head computed per map equals DINOv2's resize-concat-BN-conv, built the plain way."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bobench.dense.linear_head import (
    MATMUL_RESIZE_MAX,
    LinearHead,
    resize_bilinear,
    resize_matrix,
    resized_moments,
)

# finest first: one map at the output size, one upsampled by a non-integer factor (Gram statistics), one
# large map upsampled a little (statistics from the resized map) and a 1x1 map
SHAPES = [(6, 24, 20), (5, 7, 5), (4, 20, 17), (3, 1, 1)]


def reference(head: LinearHead, maps: list[torch.Tensor]) -> torch.Tensor:
    """DINOv2's BNHead: every map resized to the largest, concatenated, BatchNorm, 1x1 conv."""
    size = maps[0].shape[-2:]
    x = torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], dim=1)
    return head.classifier(head.bn(x))


def make(seed: int = 0, batch: int = 3, grad: bool = False) -> tuple[LinearHead, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    head = LinearHead([c for c, _, _ in SHAPES], 5)
    with torch.no_grad():  # a trained-looking head: not the init's zero bias and unit affine
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    # offset means (as real features have) check the centred, two-pass variance
    maps = [torch.randn(batch, c, h, w, generator=g) * 3 + 5 for c, h, w in SHAPES]
    return head, [m.requires_grad_(grad) for m in maps]


def test_resize_matrix_is_what_interpolate_does():
    m = torch.randn(2, 3, 7, 5)
    a_h, a_w = resize_matrix(7, 24), resize_matrix(5, 19)
    want = F.interpolate(m, size=(24, 19), mode="bilinear", align_corners=False)
    torch.testing.assert_close(a_h @ m @ a_w.T, want)  # float32 tolerances
    assert resize_matrix(4, 4).equal(torch.eye(4))


@pytest.mark.parametrize(
    ("shape", "size"), [((3, 3), (24, 24)), ((24, 20), (96, 80)), ((7, 30), (5, 64)), ((40, 36), (96, 90))]
)
def test_resize_bilinear_equals_interpolate_with_gradients(shape, size):
    """Matrix products up to MATMUL_RESIZE_MAX pixels a side (upsampling, downsampling, mixed), the kernel
    above; values and input gradients as F.interpolate's."""
    x = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    g = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    got = resize_bilinear(x, size)
    want = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])
    assert (max(shape) <= MATMUL_RESIZE_MAX) == (got.grad_fn.name() != want.grad_fn.name())
    assert resize_bilinear(x, shape) is x


@pytest.mark.parametrize("shape", [(7, 5), (20, 17), (24, 20), (1, 1)])
def test_moments_equal_those_of_the_resized_map(shape):
    m = torch.randn(3, 4, *shape, dtype=torch.float64) * 2 + 7
    var, mean = torch.var_mean(
        F.interpolate(m, size=(24, 20), mode="bilinear", align_corners=False), dim=(0, 2, 3), unbiased=False
    )
    got_mean, got_var = resized_moments(m, (24, 20))
    torch.testing.assert_close(got_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_var.double(), var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_step_equals_the_plain_head(momentum):
    head, maps = make(grad=True)
    head.bn.momentum = momentum
    plain = copy.deepcopy(head)
    head.train(), plain.train()
    out = head(maps)
    want = reference(plain, maps)
    assert out.shape == (3, 5, 24, 20)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    # running statistics (unbiased variance, momentum or cumulative average) and the batch counter
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(head.bn, name), getattr(plain.bn, name), rtol=1e-5, atol=1e-5)
    # gradients of every parameter and of the maps (through the batch statistics, as end-to-end needs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, [*head.parameters(), *maps], g)
    ref = torch.autograd.grad(want, [*plain.parameters(), *maps], g)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_eval_uses_running_statistics():
    head, maps = make(batch=2)
    with torch.no_grad():
        head.bn.running_mean.copy_(torch.randn(head.bn.num_features))
        head.bn.running_var.copy_(torch.rand(head.bn.num_features) + 0.5)
    head.eval()
    torch.testing.assert_close(head(maps), reference(head, maps), rtol=1e-4, atol=1e-4)
    assert int(head.bn.num_batches_tracked) == 0


def test_no_running_statistics_and_no_affine():
    g = torch.Generator().manual_seed(3)
    head = LinearHead([4, 2], 3)
    head.bn = nn.BatchNorm2d(6, affine=False, track_running_stats=False)
    maps = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 2, 3, 3, generator=g)]
    head.eval()  # without running statistics, eval uses the batch's too
    torch.testing.assert_close(head(maps), reference(head, maps), rtol=1e-4, atol=1e-4)


def test_other_norm_layers_take_the_plain_path():
    calls = []

    class Norm(nn.BatchNorm2d):  # stands for SyncBatchNorm, whose statistics span the ranks
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(x.shape))
            return super().forward(x)

    head, maps = make()
    head.bn = Norm(head.bn.num_features)
    plain = copy.deepcopy(head)
    torch.testing.assert_close(head(maps), reference(plain, maps))
    assert calls == [(3, 18, 24, 20)] * 2  # the head called it on the concatenated map, as the reference


def test_a_single_value_per_channel_is_refused_in_training():
    head = LinearHead([3], 2).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        head([torch.randn(1, 3, 1, 1)])


def test_resize_matrices_first_built_under_inference_mode_serve_training():
    """The resize matrices are cached: one first built under inference_mode (an evaluation) must not be an
    inference tensor, or the next training step could not save it for backward."""
    size = (17, 29)  # a size no other test asks for, so the matrices are built here
    with torch.inference_mode():
        resize_bilinear(torch.randn(1, 2, 5, 7), size)
    x = torch.randn(1, 2, 5, 7, requires_grad=True)
    resize_bilinear(x, size).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
