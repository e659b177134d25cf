"""Detectors for any bobench backbone: Faster / Mask R-CNN and their Cascade versions, torchvision parts.

:func:`build_detector` is the one front door. It wraps the backbone in a
:class:`~bobench.dense.neck.BackboneFPN` and returns a torchvision ``GeneralizedRCNN`` (``FasterRCNN`` or
``MaskRCNN``; the cascade kinds swap ``model.roi_heads`` for a
:class:`~bobench.dense.cascade.CascadeRoIHeads`). Its inputs and outputs are torchvision's: a list of
``[3, H, W]`` images in ``[0, 1]`` (normalised inside with the backbone card's mean and std) and, in
training, targets ``{"boxes" [N, 4] xyxy float, "labels" [N] int64 in 1..num_classes-1, "masks" [N, H, W]
uint8}``; it returns a loss dict in training and, in eval, one dict per image with ``boxes``, ``labels``,
``scores`` (and ``masks [N, 1, H, W]`` probabilities).

Head sets (``heads``):

* ``"4conv1fc"``: BoB's heads as torchvision's ``maskrcnn_resnet50_fpn_v2`` builds them: RPN head with two
  3x3 convs, box head of 4 conv (256, BatchNorm) + 1 fc (1024), mask head of 4 conv (256, BatchNorm).
  (BoB's ViT configs use LayerNorm in these heads and its CNN configs SyncBN; one BatchNorm set here.)
* ``"slim"``: CPU tests and demos: one-conv RPN head, ``TwoMLPHead`` with ``representation_size`` units,
  a 2-conv mask head with ``mask_channels``; pair it with small ``rpn_*_top_n`` and ``box_batch_size``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from bobench.backbones.base import Backbone
from bobench.dense.cascade import CASCADE_IOUS, CASCADE_LOSS_WEIGHTS, CASCADE_WEIGHTS, CascadeRoIHeads
from bobench.dense.neck import BackboneFPN
from bobench.registry import suggest

KINDS = ("mask_rcnn", "cascade_mask_rcnn", "faster_rcnn", "cascade_rcnn")
HEADS = ("4conv1fc", "slim")


@dataclass(frozen=True)
class DetectorConfig:
    """Everything :func:`build_detector` reads besides the backbone and class count (torchvision defaults).

    Sizes, sampling and thresholds have ``FasterRCNN``'s names and defaults; ``image_mean`` / ``image_std``
    default to the backbone card's preprocessing, so datasets hand over images in ``[0, 1]``.
    """

    kind: Literal["mask_rcnn", "cascade_mask_rcnn", "faster_rcnn", "cascade_rcnn"] = "mask_rcnn"
    heads: Literal["4conv1fc", "slim"] = "4conv1fc"
    fpn_channels: int = 256
    frozen: bool = False
    #: end-to-end only: backbone BatchNorm layers stay in eval mode (mmdet's norm_eval; see BackboneFPN)
    norm_eval: bool = True
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    min_size: int = 800
    max_size: int = 1333
    #: anchors of each level are 8 x its stride (32..512 on strides 4..64, torchvision's FPN default)
    anchor_scale: float = 8.0
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    #: slim heads only
    representation_size: int = 128
    mask_channels: int = 32
    #: cascade kinds only (see bobench.dense.cascade)
    cascade_ious: tuple[float, ...] = CASCADE_IOUS
    cascade_weights: tuple[tuple[float, ...], ...] = CASCADE_WEIGHTS
    cascade_loss_weights: tuple[float, ...] = CASCADE_LOSS_WEIGHTS
    class_agnostic: bool = True
    score_mean: Literal["probs", "logits"] = "probs"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown detector kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.heads not in HEADS:
            raise ValueError(f"unknown head set {self.heads!r}; choose one of {', '.join(HEADS)}")


def box_head(cfg: DetectorConfig, channels: int) -> nn.Module:
    """One box head on 7x7 RoIs of ``channels``; its output width is :func:`box_head_width`."""
    if cfg.heads == "4conv1fc":
        return FastRCNNConvFCHead((channels, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d)
    return TwoMLPHead(channels * 7 * 7, cfg.representation_size)


def box_head_width(cfg: DetectorConfig) -> int:
    """Output width of the configured box head (the predictor's input)."""
    return 1024 if cfg.heads == "4conv1fc" else cfg.representation_size


def box_predictor(width: int, num_classes: int, class_agnostic: bool) -> FastRCNNPredictor:
    """``FastRCNNPredictor``; class-agnostic regression swaps ``bbox_pred`` for 4 shared outputs."""
    predictor = FastRCNNPredictor(width, num_classes)
    if class_agnostic:
        predictor.bbox_pred = nn.Linear(width, 4)
    return predictor


def mask_branch(cfg: DetectorConfig, channels: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Mask head and predictor (28x28 masks from 14x14 RoIs)."""
    if cfg.heads == "4conv1fc":
        head = MaskRCNNHeads(channels, [256] * 4, 1, norm_layer=nn.BatchNorm2d)
        return head, MaskRCNNPredictor(256, 256, num_classes)
    head = MaskRCNNHeads(channels, [cfg.mask_channels] * 2, 1)
    return head, MaskRCNNPredictor(cfg.mask_channels, cfg.mask_channels, num_classes)


def build_detector(
    backbone: Backbone, num_classes: int, config: DetectorConfig | None = None, **overrides: Any
) -> GeneralizedRCNN:
    """A torchvision two-stage detector on ``backbone`` (see the module docstring for the I/O contract).

    Args:
        backbone: any bobench backbone (CNN, hierarchical transformer, or plain ViT, patch 14 included).
        num_classes: torchvision's convention: object classes **plus one** for background (label 0).
        config: a :class:`DetectorConfig`; ``overrides`` replace its fields (``kind="cascade_mask_rcnn"``,
            ``heads="slim"``, ``fpn_channels=64``, ``min_size=96``, ...).

    Returns:
        ``MaskRCNN`` (mask kinds) or ``FasterRCNN``, in training mode; cascade kinds carry a
        :class:`~bobench.dense.cascade.CascadeRoIHeads` as ``roi_heads``.

    Raises:
        ValueError: an unknown field in ``overrides``, an unknown ``kind`` / ``heads``, or
            ``num_classes`` < 2.

    Example:
        >>> det = build_detector(create_backbone("random/timm:resnet18"), 3, kind="cascade_mask_rcnn",
        ...                      heads="slim", fpn_channels=32, min_size=96, max_size=96)
        >>> det.eval()([torch.rand(3, 96, 96)])[0].keys()
        dict_keys(['boxes', 'labels', 'scores', 'masks'])
    """
    cfg = config or DetectorConfig()
    if overrides:
        fields = {f.name for f in dataclasses.fields(DetectorConfig)}
        for key in overrides:
            if key not in fields:
                raise ValueError(f"build_detector has no option {key!r}.{suggest(key, sorted(fields))}")
        cfg = dataclasses.replace(cfg, **overrides)
    if num_classes < 2:
        raise ValueError(f"num_classes counts background too (torchvision): need >= 2, got {num_classes}")

    neck = BackboneFPN(backbone, cfg.fpn_channels, frozen=cfg.frozen, norm_eval=cfg.norm_eval)
    ch = neck.out_channels
    anchors = AnchorGenerator(
        tuple((int(cfg.anchor_scale * s),) for s in neck.strides),
        (tuple(cfg.aspect_ratios),) * len(neck.strides),
    )
    rpn_head = RPNHead(
        ch, anchors.num_anchors_per_location()[0], conv_depth=2 if cfg.heads == "4conv1fc" else 1
    )
    pre = backbone.preprocess()
    mask = cfg.kind in ("mask_rcnn", "cascade_mask_rcnn")
    cascade = cfg.kind.startswith("cascade")
    kwargs: dict[str, Any] = dict(
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        image_mean=list(cfg.image_mean or pre["mean"]),
        image_std=list(cfg.image_std or pre["std"]),
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_nms_thresh=cfg.rpn_nms_thresh,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        rpn_positive_fraction=cfg.rpn_positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(neck.featmap_names, output_size=7, sampling_ratio=2),
        box_head=box_head(cfg, ch),
        box_predictor=box_predictor(box_head_width(cfg), num_classes, class_agnostic=False),
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.box_detections_per_img,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_positive_fraction=cfg.box_positive_fraction,
    )
    if mask:
        mask_head, mask_predictor = mask_branch(cfg, ch, num_classes)
        kwargs.update(
            mask_roi_pool=MultiScaleRoIAlign(neck.featmap_names, output_size=14, sampling_ratio=2),
            mask_head=mask_head,
            mask_predictor=mask_predictor,
        )
    model: GeneralizedRCNN = (MaskRCNN if mask else FasterRCNN)(neck, None, **kwargs)
    if cascade:
        model.roi_heads = cascade_roi_heads(cfg, model, ch, num_classes)
    return model


def cascade_roi_heads(
    cfg: DetectorConfig, model: GeneralizedRCNN, channels: int, num_classes: int
) -> CascadeRoIHeads:
    """Cascade heads for ``model``: its RoI pools and mask branch, one fresh box head per stage (the
    first is the one ``model`` was built with)."""
    rh = model.roi_heads
    stages = len(cfg.cascade_ious)
    heads = [rh.box_head] + [box_head(cfg, channels) for _ in range(stages - 1)]
    predictors = [box_predictor(box_head_width(cfg), num_classes, cfg.class_agnostic) for _ in range(stages)]
    return CascadeRoIHeads(
        rh.box_roi_pool,
        heads,
        predictors,
        iou_thresholds=cfg.cascade_ious,
        bbox_reg_weights=cfg.cascade_weights,
        stage_loss_weights=cfg.cascade_loss_weights,
        class_agnostic=cfg.class_agnostic,
        score_mean=cfg.score_mean,
        batch_size_per_image=cfg.box_batch_size_per_image,
        positive_fraction=cfg.box_positive_fraction,
        score_thresh=cfg.box_score_thresh,
        nms_thresh=cfg.box_nms_thresh,
        detections_per_img=cfg.box_detections_per_img,
        mask_roi_pool=rh.mask_roi_pool,
        mask_head=rh.mask_head,
        mask_predictor=rh.mask_predictor,
    )
