"""DINOv2's linear segmentation head, computed without building the resized and concatenated map.

DINOv2's linear evaluation (its mmseg ``BNHead`` with ``resize_concat``) resizes every map to the finest,
concatenates them, and applies BatchNorm and a 1x1 conv. Every step of that is linear per channel, so the
same logits come from each map at its own resolution: fold BatchNorm's scale and shift into the conv,
apply each map's slice of the folded conv where the map lives (``K`` output channels instead of ``C_i``),
and resize and sum the ``K``-channel results. Bilinear resizing keeps constants, so the bias can be added
after. The only thing that needs the resized map is BatchNorm's batch statistics in training; they follow
from the small map too:

* the mean of ``A_h m A_w^T`` (``A`` the bilinear resize matrices) is ``a_h^T m a_w / (H W)`` with ``a`` the
  column sums of ``A``;
* the mean of its square is ``sum(m * (G_h m G_w)) / (H W)`` with ``G = A^T A``, the Gram matrices (used on
  centred maps, i.e. a two-pass variance, as BatchNorm computes it).

Where the Gram products would cost more than resizing (a large map upsampled a little), the statistics
come from the resized map instead. Running statistics, momentum (or its cumulative average when
``momentum`` is None) and the unbiased running variance follow ``nn.BatchNorm2d``. The parameters and
state dict are those of a plain ``BatchNorm2d`` + ``Conv2d``; a ``SyncBatchNorm`` (DDP on CUDA) or any other
norm layer put in ``bn`` takes the plain path, which builds the concatenated map.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MATMUL_RESIZE_MAX", "LinearHead", "resize_bilinear", "resize_matrix", "resized_moments"]

#: :func:`resize_bilinear` resizes by two matrix products when the input map is at most this many pixels
#: high and wide: more multiply-adds than the interpolation kernel, but on the CPU about 2.5x faster forward
#: and backward together (a [16, 11, 24, 24] -> 96 x 96 resize: 2.4 ms against 6.1 ms, 2-core build machine)
MATMUL_RESIZE_MAX = 32


@functools.lru_cache(maxsize=256)
def _matrix(n_in: int, n_out: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    # a normal tensor even when first asked for under inference_mode: an inference tensor, once cached,
    # could not be saved for backward by a later training step
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(n_in, dtype=torch.float32, device=device).view(1, 1, n_in, n_in)
        a = F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False)[0, 0]
        return a.to(dtype)


def resize_matrix(n_in: int, n_out: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The ``[n_out, n_in]`` float32 matrix of a bilinear resize along one axis (``align_corners=False``),
    taken from ``F.interpolate`` itself, so ``F.interpolate(m, (H, W)) == A_h @ m @ A_w.T`` (up to rounding).
    Cached per size and device: do not modify it in place."""
    return _matrix(int(n_in), int(n_out), str(torch.device(device or "cpu")), torch.float32)


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for ``[..., h, w]`` maps (no copy when
    the size is already ``size``); by matrix products for maps up to :data:`MATMUL_RESIZE_MAX` pixels a side
    (equal up to float rounding), by the interpolation kernel otherwise."""
    h, w = x.shape[-2:]
    hh, ww = int(size[0]), int(size[1])
    if (h, w) == (hh, ww):
        return x
    if max(h, w) > MATMUL_RESIZE_MAX or x.dim() != 4 or not x.is_floating_point():
        return F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False)
    dtype, device = x.dtype, str(x.device)
    out = x
    if w != ww:
        out = out @ _matrix(w, ww, device, dtype).T
    if h != hh:
        out = _matrix(h, hh, device, dtype) @ out
    return out


def resized_moments(m: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (float32, ``[C]`` each) of ``m`` ``[N, C, h, w]`` bilinearly
    resized to ``size``, over batch and pixels, as ``BatchNorm2d`` computes them on the resized map;
    differentiable in ``m``."""
    m = m.float()
    n, c, h, w = m.shape
    hh, ww = int(size[0]), int(size[1])
    if (h, w) == (hh, ww):
        var, mean = torch.var_mean(m, dim=(0, 2, 3), unbiased=False)
        return mean, var
    a_h, a_w = resize_matrix(h, hh, m.device), resize_matrix(w, ww, m.device)
    count = n * hh * ww
    mean = torch.einsum("nchw,h,w->c", m, a_h.sum(0), a_w.sum(0)) / count
    d = m - mean.view(1, c, 1, 1)  # resizing keeps constants: resize(m) - mean == resize(m - mean)
    if h * w * (h + w) <= 8 * hh * ww:
        t = torch.matmul(torch.matmul(a_h.T @ a_h, d), a_w.T @ a_w)
        var = (d * t).sum(dim=(0, 2, 3)) / count
    else:
        var = resize_bilinear(d, (hh, ww)).square().mean(dim=(0, 2, 3))
    return mean, var


class LinearHead(nn.Module):
    """DINOv2's linear segmentation head (mmseg ``BNHead``): BatchNorm2d + 1x1 conv.

    Args:
        in_channels: channels of each input map, finest first.
        n_classes: number of classes ``K``.

    ``forward(maps)`` takes one ``[B, C_i, h_i, w_i]`` map per ``in_channels`` entry and returns logits
    ``[B, K, h, w]`` at the largest map's resolution: those of BatchNorm + conv on all maps bilinearly
    resized to that size and concatenated (DINOv2's ``resize_concat``), computed as the module docstring
    says (equal up to float rounding; the tests compare both ways, gradients and running statistics too).
    """

    def __init__(self, in_channels: Sequence[int], n_classes: int) -> None:
        super().__init__()
        self.in_channels = tuple(int(c) for c in in_channels)
        self.bn = nn.BatchNorm2d(sum(self.in_channels))
        self.classifier = nn.Conv2d(sum(self.in_channels), n_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)  # mmseg's init of ``conv_seg``
        nn.init.zeros_(self.classifier.bias)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        if type(self.bn) is not nn.BatchNorm2d:  # e.g. SyncBatchNorm: its statistics span the ranks
            return self.classifier(self.bn(torch.cat([resize_bilinear(m, size) for m in maps], dim=1)))
        mean, var = self._statistics(maps, size)
        bn = self.bn
        inv = torch.rsqrt(var + bn.eps)
        scale = inv * bn.weight if bn.affine else inv
        shift = bn.bias - mean * scale if bn.affine else -mean * scale
        weight = self.classifier.weight.flatten(1)  # [K, C]
        folded = weight * scale
        bias = weight @ shift
        if self.classifier.bias is not None:
            bias = bias + self.classifier.bias
        out = None
        start = 0
        for m in maps:
            c = m.shape[1]
            part = resize_bilinear(F.conv2d(m, folded[:, start : start + c, None, None].to(m.dtype)), size)
            out = part if out is None else out + part
            start += c
        return out + bias.view(1, -1, 1, 1).to(out.dtype)

    def _statistics(self, maps: Sequence[torch.Tensor], size: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """BatchNorm's mean and variance for this call: the batch's (updating the running ones) in training
        or without running statistics, else the running ones; as ``F.batch_norm`` chooses."""
        bn = self.bn
        if not bn.training and bn.running_mean is not None:
            return bn.running_mean, bn.running_var
        count = maps[0].shape[0] * int(size[0]) * int(size[1])
        if bn.training and count == 1:  # as F.batch_norm refuses
            raise ValueError(f"Expected more than 1 value per channel when training, got {count}")
        with torch.autocast(maps[0].device.type, enabled=False):
            moments = [resized_moments(m, size) for m in maps]
        mean = torch.cat([mu for mu, _ in moments])
        var = torch.cat([v for _, v in moments])
        if bn.training and bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                unbiased = var * (count / (count - 1))
                bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), factor)
                bn.running_var.lerp_(unbiased.detach().to(bn.running_var.dtype), factor)
        return mean, var
