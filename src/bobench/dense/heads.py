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
  3x3 convs, box head of 4 conv (256, normed) + 1 fc (1024), mask head of 4 conv (256, normed). The norm
  (``head_norm``) is BoB's per backbone by default: LayerNorm (channel-wise, ``timm`` ``LayerNorm2d``) for
  plain ViTs, as its ViTDet configs, BatchNorm otherwise (its CNN configs' SyncBN: the trainer converts
  BatchNorm to SyncBatchNorm under DDP on CUDA).
* ``"slim"``: CPU tests and demos: one-conv RPN head, ``TwoMLPHead`` with ``representation_size`` units,
  a 2-conv mask head with ``mask_channels``; pair it with small ``rpn_*_top_n`` and ``box_batch_size``.

The cascade's box loss (``box_loss``) is BoB's per backbone by default too: GIoU x10 on decoded boxes for
CNN and hierarchical backbones, smooth L1 for plain ViTs. Faster / Mask R-CNN keep torchvision's smooth L1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
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
    #: "auto": GIoU for backbones with their own pyramid, smooth L1 for plain ViTs (BoB's configs)
    box_loss: Literal["auto", "smooth_l1", "giou"] = "auto"
    giou_weight: float = 10.0
    #: 4conv1fc heads only; "auto": LayerNorm for plain ViTs, BatchNorm otherwise (BoB's configs)
    head_norm: Literal["auto", "batch", "layer"] = "auto"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown detector kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.heads not in HEADS:
            raise ValueError(f"unknown head set {self.heads!r}; choose one of {', '.join(HEADS)}")
        if self.box_loss not in ("auto", "smooth_l1", "giou"):
            raise ValueError(f"unknown box_loss {self.box_loss!r}; choose auto, smooth_l1 or giou")
        if self.box_loss == "giou" and not (self.kind.startswith("cascade") and self.class_agnostic):
            raise ValueError("box_loss='giou' is for the class-agnostic cascade kinds (torchvision's RoIHeads "
                             "regresses with smooth L1)")  # fmt: skip
        if self.head_norm not in ("auto", "batch", "layer"):
            raise ValueError(f"unknown head_norm {self.head_norm!r}; choose auto, batch or layer")

    def for_backbone(self, plain_vit: bool) -> DetectorConfig:
        """This config with ``"auto"`` choices made as BoB's configs make them for such a backbone."""
        loss = self.box_loss
        if loss == "auto":
            cascade = self.kind.startswith("cascade") and self.class_agnostic
            loss = "giou" if cascade and not plain_vit else "smooth_l1"
        norm = self.head_norm if self.head_norm != "auto" else ("layer" if plain_vit else "batch")
        return dataclasses.replace(self, box_loss=loss, head_norm=norm)


def _norm(cfg: DetectorConfig) -> type[nn.Module]:
    from timm.layers import LayerNorm2d

    if cfg.head_norm == "auto":
        raise ValueError("resolve head_norm with DetectorConfig.for_backbone first")
    return LayerNorm2d if cfg.head_norm == "layer" else nn.BatchNorm2d


def box_head(cfg: DetectorConfig, channels: int) -> nn.Module:
    """One box head on 7x7 RoIs of ``channels``; its output width is :func:`box_head_width`."""
    if cfg.heads == "4conv1fc":
        return FastRCNNConvFCHead((channels, 7, 7), [256] * 4, [1024], norm_layer=_norm(cfg))
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
        head = MaskRCNNHeads(channels, [256] * 4, 1, norm_layer=_norm(cfg))
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
    cfg = cfg.for_backbone(plain_vit=neck.simple_pyramid)
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
    decode_in_float32(model)
    return model


def _float32(x: Any) -> Any:
    """``x`` with every floating tensor inside (tensors, lists, tuples) in float32 (as is when it is)."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, list | tuple):
        return type(x)(_float32(v) for v in x)
    return x


def _float32_outputs(module: nn.Module, args: Any, output: Any) -> Any:
    return _float32(output)


def _float32_anchors(module: nn.Module, args: Any) -> Any:
    """The anchor generator's feature maps as float32 stand-ins of the same shape (it reads only their
    shape, dtype and device; zero-stride views, nothing allocated), so anchors are built in float32."""
    images, features = args
    if all(f.dtype == torch.float32 for f in features):
        return None
    return images, [torch.zeros((), dtype=torch.float32, device=f.device).expand(f.shape) for f in features]


def decode_in_float32(model: GeneralizedRCNN) -> None:
    """Box geometry and scores in float32 under autocast (mmdet's ``force_fp32`` on its heads' decoding).

    torchvision builds anchors in the feature maps' dtype and decodes boxes in the head outputs' dtype, and
    its RoI heads cast the ground-truth boxes to the proposals' dtype: under bf16 autocast anchors, proposals,
    regression targets and detections would be bfloat16 (8 significant bits: 4-8 px steps at 1024 px) and
    scores would tie. Forward hooks (no new modules: the state_dict is unchanged) make the anchors and the
    outputs of the RPN head, box predictor(s) and mask predictor float32; the convolutions and linear
    layers still run in the autocast dtype. In float32 they change nothing.
    """
    model.rpn.anchor_generator.register_forward_pre_hook(_float32_anchors)
    heads = model.roi_heads
    boxes = heads.box_predictors if isinstance(heads, CascadeRoIHeads) else [heads.box_predictor]
    predictors = [model.rpn.head, *boxes]
    if heads.mask_predictor is not None:
        predictors.append(heads.mask_predictor)
    for m in predictors:
        m.register_forward_hook(_float32_outputs)


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
        box_loss="giou" if cfg.box_loss == "giou" else "smooth_l1",
        box_loss_weight=cfg.giou_weight if cfg.box_loss == "giou" else 1.0,
        batch_size_per_image=cfg.box_batch_size_per_image,
        positive_fraction=cfg.box_positive_fraction,
        score_thresh=cfg.box_score_thresh,
        nms_thresh=cfg.box_nms_thresh,
        detections_per_img=cfg.box_detections_per_img,
        mask_roi_pool=rh.mask_roi_pool,
        mask_head=rh.mask_head,
        mask_predictor=rh.mask_predictor,
    )
