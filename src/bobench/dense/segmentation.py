"""Semantic segmentation on any bobench backbone: DINOv2's linear head or UPerNet, plus mmseg's inference modes.

:func:`build_segmenter` is the one front door; it returns a :class:`SegmentationModel`, which maps an image
batch ``[B, 3, H, W]`` in ``[0, 1]`` (normalised inside with the backbone card's mean and std, as the
detectors do) to logits ``[B, K, H, W]``. It only calls ``backbone.features(x)``, so there is no
per-backbone code. Heads (``head``):

* ``"linear"``: DINOv2's linear evaluation (its mmseg ``BNHead``): BatchNorm + 1x1 conv on the last map, or
  on all maps resized to the finest and concatenated (``maps="all"``, DINOv2's ``resize_concat``), computed
  per map without building the concatenation (:mod:`bobench.dense.linear_head`);
* ``"upernet"``: mmseg's ``UPerHead``: a pyramid pooling module on the last map, an FPN over all maps, their
  levels fused at the finest stride, dropout and a 1x1 classifier.

For a plain ViT (``backbone.pyramid``) the "last" map is its own token map, the stride-16 level of the
adapters' parameter-free pyramid (as :class:`~bobench.dense.neck.BackboneFPN` takes it), not the max-pooled
stride-32 level. Frozen maps can be cached: :meth:`SegmentationModel.backbone_maps` gives what the head
reads and :meth:`SegmentationModel.forward_maps` finishes the forward from them, bit for bit.

Example:
    >>> seg = build_segmenter(create_backbone("random/timm:test_resnet"), 5, head="upernet", channels=32)
    >>> seg(torch.rand(2, 3, 100, 100)).shape
    torch.Size([2, 5, 100, 100])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

from bobench.backbones.base import Backbone
from bobench.dense.linear_head import LinearHead, resize_bilinear
from bobench.dense.neck import hold_backbone_eval, input_multiple
from bobench.registry import suggest

HEADS = ("linear", "upernet")


def _classifier(channels: int, n_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, n_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)  # mmseg's init of ``conv_seg``
    nn.init.zeros_(conv.bias)
    return conv


def _conv_bn_relu(cin: int, cout: int, k: int) -> Conv2dNormActivation:
    # mmseg's ConvModule(norm=BN, act=ReLU): no conv bias, since BatchNorm follows
    return Conv2dNormActivation(cin, cout, k, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU)


class UPerNetHead(nn.Module):
    """UPerNet (Xiao et al. 2018) as mmseg's ``UPerHead``, BatchNorm + ReLU conv blocks.

    Pyramid pooling (adaptive average pools of ``pool_scales`` on the last map, 1x1 conv each, upsampled and
    concatenated with it, 3x3 bottleneck) gives the top FPN level; the other maps get 1x1 laterals, a
    bilinear top-down pathway and 3x3 convs; all levels are upsampled to the finest, concatenated and fused
    by a 3x3 conv, then ``Dropout2d`` and a 1x1 classifier.

    Args:
        in_channels: channels of each input map, finest first (at least one).
        n_classes: number of classes ``K``.
        channels: width of every internal level (512 in mmseg's configs).
        pool_scales: output sizes of the pyramid pooling module.
        dropout: ``Dropout2d`` rate before the classifier (0.1 in mmseg's configs).

    ``forward(maps)`` returns logits ``[B, K, h_0, w_0]`` at the first (finest) map's resolution. Training
    needs a batch of at least 2 (BatchNorm on the 1x1 pooled map).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        n_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_channels = tuple(int(c) for c in in_channels)
        top = self.in_channels[-1]
        self.pool_scales = tuple(int(s) for s in pool_scales)
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv_bn_relu(top, channels, 1)) for s in self.pool_scales
        )
        self.bottleneck = _conv_bn_relu(top + len(self.pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in self.in_channels[:-1])
        self.fuse = _conv_bn_relu(len(self.in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, n_classes)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        top = maps[-1]
        pooled = [resize_bilinear(stage(top), top.shape[-2:]) for stage in self.ppm]
        levels = [conv(m) for conv, m in zip(self.laterals, maps[:-1], strict=True)]
        levels.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down; out of place, as the laterals are reused
            levels[i - 1] = levels[i - 1] + resize_bilinear(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(lv) for conv, lv in zip(self.fpn_convs, levels[:-1], strict=True)] + [levels[-1]]
        size = outs[0].shape[-2:]
        x = self.fuse(torch.cat([resize_bilinear(o, size) for o in outs], dim=1))
        return self.classifier(self.dropout(x))


def map_indices(backbone: Backbone, maps: str | Sequence[int]) -> tuple[int, ...]:
    """Indices into ``backbone.features(x)`` that a head reads, sorted (finest first).

    Args:
        maps: ``"last"`` (the coarsest map; for a plain ViT its own stride-16 token map), ``"all"``, or
            explicit indices (negative ones count from the end).

    Raises:
        ValueError: an unknown name, an index out of range, or no index.
    """
    info = backbone.feature_info
    n = len(info)
    if isinstance(maps, str):
        if maps == "all":
            return tuple(range(n))
        if maps == "last":
            # a plain ViT's coarser pyramid level is max-pooled from its token map: lossy
            sixteen = [i for i, f in enumerate(info) if f.stride == 16]
            return (sixteen[0],) if getattr(backbone, "pyramid", False) and sixteen else (n - 1,)
        raise ValueError(f"unknown maps {maps!r}; choose 'last', 'all' or a list of map indices (0..{n - 1})")
    picked = sorted({int(i) % n if -n <= int(i) < n else int(i) for i in maps})
    if not picked or picked[0] < 0 or picked[-1] >= n:
        raise ValueError(f"map indices {list(maps)} are not a non-empty subset of 0..{n - 1}")
    return tuple(picked)


class SegmentationModel(nn.Module):
    """A backbone and a segmentation head: ``[B, 3, H, W]`` in ``[0, 1]`` → logits ``[B, K, H, W]``.

    Args:
        backbone: any :class:`~bobench.backbones.base.Backbone`.
        head: a module mapping the selected maps (finest first) to logits at some stride, e.g.
            :class:`LinearHead` or :class:`UPerNetHead`.
        in_index: which of ``backbone.features(x)`` the head reads (see :func:`map_indices`); all by default.
        frozen: the backbone stays in eval mode with ``requires_grad=False`` and runs under ``no_grad``;
            only the head trains (``train()`` leaves the backbone in eval).
        norm_eval: end-to-end only: the backbone's BatchNorm layers stay in eval mode (mmseg's
            ``norm_eval``), so their running statistics stay the pretrained ones.

    The input is normalised with the card's mean and std, then zero-padded bottom and right to a multiple
    of :attr:`input_multiple` (see :func:`~bobench.dense.neck.input_multiple`); the head's logits are
    bilinearly resized to the padded size (mmseg's ``resize(..., align_corners=False)``) and cropped.

    Raises:
        ValueError: ``head.in_channels`` (where the head has one) disagrees with the selected maps.
    """

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        *,
        in_index: Sequence[int] | None = None,
        frozen: bool = True,
        norm_eval: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.in_index = map_indices(backbone, "all" if in_index is None else in_index)
        channels = tuple(backbone.feature_info[i].channels for i in self.in_index)
        expected = getattr(head, "in_channels", channels)
        if tuple(expected) != channels:
            raise ValueError(
                f"the head expects maps of {tuple(expected)} channels; {backbone.card.name}'s maps "
                f"{list(self.in_index)} have {channels}"
            )
        self.input_multiple = input_multiple(backbone)
        self.frozen = bool(frozen)
        self.norm_eval = bool(norm_eval)
        pre = backbone.preprocess()
        # non-persistent: they follow .to(device) but come from the card, not from checkpoints
        self.register_buffer("mean", torch.tensor(pre["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre["std"]).view(1, -1, 1, 1), persistent=False)
        if self.frozen:
            self.backbone.requires_grad_(False)
        self.train(self.training)

    @property
    def pad_value(self) -> tuple[float, ...]:
        """The ``[0, 1]`` colour that normalisation maps to zero, i.e. what the model's own padding adds."""
        return tuple(float(v) for v in self.mean.flatten())

    def train(self, mode: bool = True) -> SegmentationModel:
        """Set training mode, keeping a frozen backbone (or, with ``norm_eval``, its BatchNorms) in eval."""
        super().train(mode)
        hold_backbone_eval(self.backbone, self.frozen, self.norm_eval)
        return self

    def padded_size(self, hw: Sequence[int]) -> tuple[int, int]:
        """``(H, W)`` rounded up to :attr:`input_multiple`: the size the backbone actually sees."""
        m = self.input_multiple
        return (-(-int(hw[0]) // m) * m, -(-int(hw[1]) // m) * m)

    def backbone_input(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` → normalised and zero-padded to :meth:`padded_size`."""
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        ph, pw = self.padded_size(x.shape[-2:])
        if (ph, pw) != tuple(x.shape[-2:]):
            x = F.pad(x, (0, pw - x.shape[-1], 0, ph - x.shape[-2]))
        return x

    def backbone_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps the head reads (``in_index`` of ``backbone.features``) for ``x`` in ``[0, 1]``.

        This is what a frozen protocol caches: each is ``[B, C_i, h_i, w_i]`` in the backbone's dtype, for
        the *padded* input. Computed without grad when frozen.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            maps = self.backbone.features(self.backbone_input(x))
        return [maps[i] for i in self.in_index]

    def forward_maps(self, maps: Sequence[torch.Tensor], out_hw: Sequence[int]) -> torch.Tensor:
        """Run the head on precomputed backbone maps: logits ``[B, K, H, W]`` for an ``out_hw`` image.

        Args:
            maps: either all of ``backbone.features`` (one per ``feature_info`` entry) or just the selected
                ones (:meth:`backbone_maps`), computed on the padded input (:meth:`backbone_input`); cast to
                the head's dtype (so half-precision caches work), never moved between devices.
            out_hw: the original, unpadded ``(H, W)``.

        Raises:
            ValueError: ``maps`` has neither length.
        """
        if len(maps) == len(self.backbone.feature_info):
            maps = [maps[i] for i in self.in_index]
        elif len(maps) != len(self.in_index):
            raise ValueError(
                f"got {len(maps)} maps; pass all {len(self.backbone.feature_info)} backbone maps or the "
                f"{len(self.in_index)} selected ones (indices {list(self.in_index)})"
            )
        dtype = next(self.head.parameters()).dtype
        logits = self.head([m.to(dtype) for m in maps])
        h, w = int(out_hw[0]), int(out_hw[1])
        return resize_bilinear(logits, self.padded_size((h, w)))[..., :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` → logits ``[B, K, H, W]``."""
        return self.forward_maps(self.backbone_maps(x), x.shape[-2:])


def build_segmenter(
    backbone: Backbone,
    n_classes: int,
    head: str = "linear",
    *,
    maps: str | Sequence[int] | None = None,
    channels: int = 512,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    dropout: float = 0.1,
    frozen: bool = True,
    norm_eval: bool = True,
) -> SegmentationModel:
    """A :class:`SegmentationModel` with a ``"linear"`` or ``"upernet"`` head on ``backbone``.

    Args:
        n_classes: number of classes ``K`` (no background class added; ignored pixels are the loss's and
            metric's business).
        head: ``"linear"`` (:class:`LinearHead`) or ``"upernet"`` (:class:`UPerNetHead`).
        maps: the maps the head reads (:func:`map_indices`); default ``"last"`` for linear, ``"all"`` for
            UPerNet.
        channels, pool_scales, dropout: UPerNet only (mmseg's 512, (1, 2, 3, 6), 0.1).
        frozen, norm_eval: see :class:`SegmentationModel`.

    Raises:
        ValueError: an unknown head (the message lists the choices), bad ``maps``, ``n_classes`` < 1.
    """
    if head not in HEADS:
        raise ValueError(
            f"unknown segmentation head {head!r}; choose one of {', '.join(HEADS)}.{suggest(head, list(HEADS))}"
        )
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    index = map_indices(backbone, maps if maps is not None else ("last" if head == "linear" else "all"))
    in_channels = [backbone.feature_info[i].channels for i in index]
    module: nn.Module
    if head == "linear":
        module = LinearHead(in_channels, n_classes)
    else:
        module = UPerNetHead(in_channels, n_classes, channels, pool_scales, dropout)
    return SegmentationModel(backbone, module, in_index=index, frozen=frozen, norm_eval=norm_eval)


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    h, w = (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {v}")
    return h, w


def slide_inference(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    n_classes: int,
    window: int | Sequence[int],
    stride: int | Sequence[int],
    pad_value: float | Sequence[float] | None = None,
) -> torch.Tensor:
    """Sliding-window logits, averaged where windows overlap (mmseg's ``slide_inference``).

    Windows start every ``stride`` pixels; the last one in each direction is moved back to end at the
    border, so every pixel is covered. An image smaller than the window is first padded bottom and right
    with ``pad_value`` (default: ``model.pad_value`` where the model has one, i.e. the colour its own
    padding adds, else 0) and the result cropped back. Run it under ``torch.no_grad()``.

    Args:
        model: maps ``[B, 3, h, w]`` (a window) to logits ``[B, n_classes, h, w]``.
        image: ``[B, 3, H, W]`` as ``model`` takes it (``[0, 1]`` for a :class:`SegmentationModel`).
        window, stride: ``int`` or ``(h, w)``; ``stride`` at most ``window``.

    Returns:
        float32 logits ``[B, n_classes, H, W]`` on ``image``'s device.

    Raises:
        ValueError: non-positive sizes, a stride above the window (pixels left uncovered), or a model
            output of the wrong shape.
    """
    wh, ww = _pair(window, "window")
    sh, sw = _pair(stride, "stride")
    if sh > wh or sw > ww:
        raise ValueError(f"stride {stride} exceeds window {window}: some pixels would get no prediction")
    b, c, h, w = image.shape
    if h < wh or w < ww:
        value = getattr(model, "pad_value", 0.0) if pad_value is None else pad_value
        fill = torch.as_tensor(value, dtype=image.dtype, device=image.device).reshape(1, -1, 1, 1)
        padded = fill.expand(b, c, max(h, wh), max(w, ww)).clone()
        padded[..., :h, :w] = image
        image = padded
    ph, pw = image.shape[-2:]
    logits = image.new_zeros((b, n_classes, ph, pw), dtype=torch.float32)
    count = image.new_zeros((1, 1, ph, pw), dtype=torch.float32)
    for gy in range(max(ph - wh + sh - 1, 0) // sh + 1):
        for gx in range(max(pw - ww + sw - 1, 0) // sw + 1):
            y1, x1 = min(gy * sh, ph - wh), min(gx * sw, pw - ww)
            out = model(image[..., y1 : y1 + wh, x1 : x1 + ww])
            if tuple(out.shape) != (b, n_classes, wh, ww):
                raise ValueError(
                    f"model returned {tuple(out.shape)} for a window; expected {(b, n_classes, wh, ww)}"
                )
            logits[..., y1 : y1 + wh, x1 : x1 + ww] += out.float()
            count[..., y1 : y1 + wh, x1 : x1 + ww] += 1
    return (logits / count)[..., :h, :w]


def multiscale_flip_inference(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
    flip: bool = True,
) -> torch.Tensor:
    """Test-time augmentation: softmax probabilities averaged over rescaled (and flipped) inputs.

    Each scale ``s`` resizes ``image`` bilinearly to ``round(H * s) x round(W * s)`` (no antialiasing, as
    mmseg's cv2 resize), runs ``model_fn``, resizes the logits back to ``H x W``, un-flips them and takes
    the softmax over classes (mmseg's ``SegTTAModel`` resizes logits, then softmaxes, then averages).

    Args:
        model_fn: ``[B, 3, h, w]`` → logits ``[B, K, h, w]`` (a model, or a :func:`slide_inference` partial).
        image: ``[B, 3, H, W]`` as ``model_fn`` takes it.

    Returns:
        float32 probabilities ``[B, K, H, W]`` (summing to 1 over ``K``); take ``argmax(1)`` for labels.
    """
    if not scales:
        raise ValueError("scales is empty")
    h, w = image.shape[-2:]
    total: torch.Tensor | None = None
    n = 0
    for s in scales:
        size = (max(1, math.floor(h * s + 0.5)), max(1, math.floor(w * s + 0.5)))
        scaled = resize_bilinear(image, size)
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            logits = resize_bilinear(model_fn(x).float(), (h, w))
            probs = (logits.flip(-1) if flipped else logits).softmax(dim=1)
            total = probs if total is None else total + probs
            n += 1
    assert total is not None
    return total / n
