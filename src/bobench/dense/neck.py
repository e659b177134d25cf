"""Detection necks over any bobench backbone: an FPN, or ViTDet's learned simple pyramid for plain ViTs.

:class:`BackboneFPN` is the ``backbone`` a torchvision ``GeneralizedRCNN`` expects (STYLE.md §4): a module
with an ``out_channels`` attribute whose forward maps an image batch to an ``OrderedDict`` of maps, here
named ``"0"``, ``"1"``, ... finest first plus ``"pool"`` (torchvision's ``LastLevelMaxPool``). It calls
``backbone.features(x)`` only, so there is no per-backbone code:

* hierarchical backbones (CNNs, Swin, ...): up to ``levels`` maps of stride >= ``min_stride`` go into
  torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork` (no norm, as mmdet's FPN in BoB);
* plain ViTs (``backbone.pyramid``): the adapters' parameter-free pyramid is replaced by ViTDet's *learned*
  simple feature pyramid (:class:`SimpleFeaturePyramid`) on the ViT's last map, as BoB's ViTDet configs.

Example:
    >>> neck = BackboneFPN(create_backbone("random/timm:resnet18"), out_channels=64)
    >>> {k: tuple(v.shape) for k, v in neck(torch.zeros(2, 3, 96, 96)).items()}
    {'0': (2, 64, 24, 24), '1': (2, 64, 12, 12), '2': (2, 64, 6, 6), '3': (2, 64, 3, 3), 'pool': (2, 64, 2, 2)}
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from bobench.backbones.base import Backbone

#: the BatchNorm layers ``norm_eval`` keeps in eval mode (timm's BatchNormAct2d subclasses BatchNorm2d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def hold_backbone_eval(backbone: nn.Module, frozen: bool, norm_eval: bool) -> None:
    """After ``model.train(mode)``: put a frozen ``backbone`` back in eval mode, or with ``norm_eval``
    (mmdetection's, as BoB) only its BatchNorms, whose running statistics then stay as pretrained."""
    if frozen:
        backbone.eval()
    elif norm_eval:
        for m in backbone.modules():
            if isinstance(m, BATCH_NORMS):
                m.eval()


def nominal_stride(stride: float) -> int:
    """The power of two nearest a map's stride (14 → 16): the stride RoIAlign and the anchors assume."""
    return 2 ** round(math.log2(stride))


def to_nominal_size(fmap: torch.Tensor, image_hw: tuple[int, int], stride: float) -> torch.Tensor:
    """Resize ``fmap`` to ``ceil(H / s) x ceil(W / s)`` at its nominal stride ``s`` where it is off by more
    than a rounding convention.

    A CNN map of a 100 px input may be 25 or 24 px at stride 4 (ceil vs floor); that is left alone, since
    the FPN upsamples top-down to each lateral's size and ``MultiScaleRoIAlign`` rounds the scale it infers
    to a power of two. A patch-14 map (8 px at 112 px input, stride "16") is bilinearly resized to 7 px.
    """
    s = nominal_stride(stride)
    h, w = image_hw
    ok = ({math.ceil(h / s), h // s}, {math.ceil(w / s), w // s})
    if fmap.shape[-2] in ok[0] and fmap.shape[-1] in ok[1]:
        return fmap
    size = (math.ceil(h / s), math.ceil(w / s))
    return F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)


def input_multiple(backbone: Backbone) -> int:
    """The side multiple an input must have for ``backbone.features``: ``backbone.input_multiple``, and for
    ViTs whose patch embedding rejects other sizes (timm's ``PatchEmbed`` asserts ``H % patch == 0``) their
    patch size, read duck-typed from ``model.patch_embed.patch_size`` (the Backbone contract carries no
    patch size; a detector pads to 32, which a patch of 14 does not divide)."""
    multiple = max(1, int(getattr(backbone, "input_multiple", 1)))
    patch = getattr(getattr(backbone.model, "patch_embed", None), "patch_size", None)
    if isinstance(patch, int):
        patch = (patch, patch)
    if patch:
        multiple = math.lcm(multiple, *(int(p) for p in patch))
    return multiple


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al. 2022; detectron2 ``SimpleFeaturePyramid``), learned layers.

    From one stride-16 map of ``in_channels``: stride 4 = two ``ConvTranspose2d(k2, s2)`` with LayerNorm +
    GELU between (channels /2, /4), stride 8 = one ``ConvTranspose2d`` (/2), stride 16 = identity, stride
    32 = ``MaxPool2d(2)``; each then a 1x1 conv + LayerNorm and a 3x3 conv + LayerNorm to ``out_channels``
    (convs without bias, as detectron2 does when a norm follows), then ``LastLevelMaxPool`` (stride 64).
    LayerNorm normalises over channels at each position (``timm.layers.LayerNorm2d``, eps 1e-6 as ViTDet).

    Example:
        >>> sfp = SimpleFeaturePyramid(192, 256)
        >>> [tuple(m.shape[-2:]) for m in sfp(torch.zeros(1, 192, 8, 8)).values()]
        [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        dim = in_channels
        self.scales = nn.ModuleList()
        for scale in (4.0, 2.0, 1.0, 0.5):
            layers: list[nn.Module]
            if scale == 4.0:
                layers = [
                    nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                    LayerNorm2d(dim // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
                ]
                width = dim // 4
            elif scale == 2.0:
                layers, width = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
            elif scale == 1.0:
                layers, width = [], dim
            else:
                layers, width = [nn.MaxPool2d(kernel_size=2, stride=2)], dim
            layers += [
                nn.Conv2d(width, out_channels, 1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ]
            self.scales.append(nn.Sequential(*layers))
        self.top_block = LastLevelMaxPool()
        self.out_channels = out_channels

    def forward(self, fmap: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """``[B, C, H/16, W/16]`` → ``{"0": stride 4, "1": 8, "2": 16, "3": 32, "pool": 64}``."""
        outs = [stage(fmap) for stage in self.scales]
        names = [str(i) for i in range(len(outs))]
        outs, names = self.top_block(outs, [], names)
        return OrderedDict(zip(names, outs, strict=True))


class BackboneFPN(nn.Module):
    """A bobench backbone plus an FPN (or ViTDet's learned pyramid): torchvision's detection backbone.

    Args:
        backbone: any :class:`~bobench.backbones.base.Backbone`.
        out_channels: channels of every output level (256 in BoB; 32-64 for CPU demos and tests).
        frozen: BoB's frozen setting: the backbone stays in eval mode, its parameters get
            ``requires_grad=False`` and its forward runs under ``no_grad``; the neck itself still trains.
        norm_eval: end-to-end mode only: keep the backbone's BatchNorm layers in eval mode during training
            (mmdet's ``norm_eval=True``, BoB's CNN configs), so running statistics stay the pretrained ones
            while their affine weights still train. Implemented by overriding :meth:`train` rather than by
            swapping in ``FrozenBatchNorm2d``, which would also freeze the affine weights and change the
            module tree that checkpoints and layer-decay rules see.
        levels: at most this many backbone maps (finest first) feed the FPN.
        min_stride: maps finer than this are skipped (stride-2 stems are poor detection features).

    Attributes:
        out_channels: what torchvision's detectors read to size the RPN and RoI heads.
        strides: nominal stride of each output level, ``"pool"`` included (anchor sizes follow them).
        input_multiple: inputs are padded to a multiple of this (see :func:`input_multiple`).

    Raises:
        ValueError: the backbone has no map of stride >= ``min_stride``, or a pyramid backbone has no
            stride-16 map.
    """

    def __init__(
        self,
        backbone: Backbone,
        out_channels: int = 256,
        *,
        frozen: bool = False,
        norm_eval: bool = True,
        levels: int = 4,
        min_stride: int = 4,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_multiple = input_multiple(backbone)
        self.out_channels = int(out_channels)
        self.frozen = bool(frozen)
        self.norm_eval = bool(norm_eval)
        info = backbone.feature_info
        if getattr(backbone, "pyramid", False):
            # No public accessor for a ViT's last map exists: the adapters' synthetic pyramid holds it as
            # the stride-16 level. For patch 16 that map *is* the last map (identity); for patch 14 the
            # adapter has resized the H/14 token grid to ceil(H/16) (adaptive max-pool), so the learned
            # pyramid below always starts at nominal stride 16.
            sixteen = [i for i, f in enumerate(info) if f.stride == 16]
            if not sixteen:
                raise ValueError(f"{backbone.card.name}: a pyramid backbone needs a stride-16 map")
            self.indices = sixteen[:1]
            self.pyramid: nn.Module = SimpleFeaturePyramid(info[sixteen[0]].channels, self.out_channels)
            self.strides = [4, 8, 16, 32, 64]
        else:
            self.indices = [i for i, f in enumerate(info) if f.stride >= min_stride][:levels]
            if not self.indices:
                strides = [f.stride for f in info]
                raise ValueError(
                    f"{backbone.card.name} has no feature map of stride >= {min_stride} (strides {strides})"
                )
            self.pyramid = FeaturePyramidNetwork(
                [info[i].channels for i in self.indices], self.out_channels, extra_blocks=LastLevelMaxPool()
            )
            self.strides = [nominal_stride(info[i].stride) for i in self.indices]
            self.strides.append(2 * self.strides[-1])
        self.names = [str(i) for i in range(len(self.strides) - 1)] + ["pool"]
        if self.frozen:
            self.backbone.requires_grad_(False)
        self.train(self.training)

    @property
    def simple_pyramid(self) -> bool:
        """Whether a plain ViT feeds a learned ViTDet simple pyramid (else an FPN over the backbone's maps)."""
        return isinstance(self.pyramid, SimpleFeaturePyramid)

    @property
    def featmap_names(self) -> list[str]:
        """Names of the levels RoIAlign pools from (all but ``"pool"``, as torchvision's FPN detectors)."""
        return self.names[:-1]

    def train(self, mode: bool = True) -> BackboneFPN:
        """Set training mode, keeping a frozen backbone (or, with ``norm_eval``, its BatchNorms) in eval."""
        super().train(mode)
        hold_backbone_eval(self.backbone, self.frozen, self.norm_eval)
        return self

    def backbone_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The selected backbone maps at their nominal sizes for ``x``'s size (no grad when frozen).

        An input whose sides are not a multiple of :attr:`input_multiple` is zero-padded bottom and right
        (as ``GeneralizedRCNNTransform`` pads a batch) and the maps are cropped back to ``ceil(H / s)``.
        """
        h, w = int(x.shape[-2]), int(x.shape[-1])
        m = self.input_multiple
        ph, pw = -h % m, -w % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            maps = self.backbone.features(x)
        info = self.backbone.feature_info
        out = []
        for i in self.indices:
            fmap = to_nominal_size(maps[i], (h + ph, w + pw), info[i].stride)
            s = nominal_stride(info[i].stride)
            out.append(fmap[..., : math.ceil(h / s), : math.ceil(w / s)])
        return out

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Normalised, padded image batch ``[B, 3, H, W]`` → ``OrderedDict`` of ``out_channels`` maps."""
        maps = self.backbone_maps(x)
        if isinstance(self.pyramid, SimpleFeaturePyramid):
            return self.pyramid(maps[0])
        return self.pyramid(OrderedDict((str(i), m) for i, m in enumerate(maps)))
