"""Cascade R-CNN RoI heads (Cai & Vasconcelos 2018) from torchvision parts, a drop-in for ``RoIHeads``.

No maintained Cascade R-CNN installs with torch 2.14 (ARCHITECTURE.md), so :class:`CascadeRoIHeads` builds
one from torchvision's pieces: ``MultiScaleRoIAlign``, one box head + ``FastRCNNPredictor`` per stage, and
``Matcher`` / ``BalancedPositiveNegativeSampler`` / ``BoxCoder``. It has ``RoIHeads``' forward signature and
outputs, so it replaces ``model.roi_heads`` of any torchvision ``FasterRCNN`` / ``MaskRCNN``.

Behaviour (BoB's mmdet 2.26 ``CascadeRoIHead`` unless said otherwise):

* stage ``k`` matches its proposals (ground truth appended, as torchvision does) at IoU
  ``iou_thresholds[k]`` (0.5 / 0.6 / 0.7; one threshold for fg and bg, no low-quality matches), samples
  ``batch_size_per_image`` RoIs at ``positive_fraction``, and regresses with ``BoxCoder`` weights
  ``bbox_reg_weights[k]`` ((10,10,5,5) / (20,20,10,10) / (30,30,15,15), i.e. mmdet's target stds
  0.1/0.05/0.033); its losses are scaled by ``stage_loss_weights[k]`` (1 / 0.5 / 0.25) and named
  ``loss_classifier_s{k}`` and ``loss_box_reg_s{k}``;
* the next stage's proposals are this stage's sampled RoIs, ground-truth ones dropped (mmdet re-adds them),
  refined by its regression, clipped to the image and detached;
* regression is class-agnostic by default (mmdet's cascade configs: ``reg_class_agnostic=True``, a
  predictor with 4 outputs); ``class_agnostic=False`` regresses per class (torchvision's ``RoIHeads``;
  refinement then uses the GT label in training and the arg-max foreground class at test time);
* box loss (``box_loss``): torchvision's smooth L1 on the encoded deltas (beta 1/9, summed over
  positives, divided by the sampled RoI count; mmdet's ViTDet configs use beta 1), or BoB's CNN configs'
  GIoU on the decoded boxes against the matched ground truth (mmdet's ``reg_decoded_bbox``), times
  ``box_loss_weight`` (10 in BoB), with the same normalisation;
* at test time the class score is the mean over stages of each stage's softmax (``score_mean="probs"``:
  the paper, detectron2, mmdet 3). mmdet 2.x, which BoB ran, averages the *logits* and then applies one
  softmax: ``score_mean="logits"`` reproduces that. Boxes are the last stage's regression of its RoIs;
* the mask branch (optional) runs once, on the last stage (its sampled positives in training, the final
  detections at test time). mmdet's Cascade Mask R-CNN has one mask head per stage and averages their
  test masks; one head keeps the CPU cost of tests and demos down.

With one stage, weights (10,10,5,5), IoU 0.5, loss weight 1 and ``class_agnostic=False`` this is exactly
torchvision's ``RoIHeads`` (tested bit-equal: same sampler draws, losses, detections and masks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# torchvision's own public alias of its detection utilities (Matcher, BoxCoder, sampler)
from torchvision.models.detection.roi_heads import (
    det_utils,
    fastrcnn_loss,
    maskrcnn_inference,
    maskrcnn_loss,
)
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss

CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
CASCADE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


def agnostic_box_loss(
    box_regression: torch.Tensor, labels: list[torch.Tensor], regression_targets: list[torch.Tensor]
) -> torch.Tensor:
    """``fastrcnn_loss``'s box term for a predictor with 4 class-agnostic outputs per RoI."""
    labels_cat = torch.cat(labels, dim=0)
    targets = torch.cat(regression_targets, dim=0)
    pos = torch.where(labels_cat > 0)[0]
    loss = F.smooth_l1_loss(box_regression[pos], targets[pos], beta=1 / 9, reduction="sum")
    return loss / labels_cat.numel()


class CascadeRoIHeads(nn.Module):
    """Multi-stage RoI heads; see the module docstring for the behaviour.

    Args:
        box_roi_pool: ``MultiScaleRoIAlign`` shared by all stages.
        box_heads: one box head per stage (e.g. ``FastRCNNConvFCHead`` or ``TwoMLPHead``).
        box_predictors: one ``FastRCNNPredictor`` per stage; with ``class_agnostic`` its ``bbox_pred``
            must have 4 outputs (see :func:`bobench.dense.heads.build_detector`).
        iou_thresholds, bbox_reg_weights, stage_loss_weights: one entry per stage.
        class_agnostic: 4 shared box deltas per RoI (mmdet) instead of 4 per class (torchvision).
        score_mean: ``"probs"`` (mean of per-stage softmax) or ``"logits"`` (mmdet 2.x).
        box_loss, box_loss_weight: ``"smooth_l1"`` or ``"giou"`` (class-agnostic only), and its weight.
        batch_size_per_image, positive_fraction, score_thresh, nms_thresh, detections_per_img:
            as torchvision's ``RoIHeads`` (``box_*`` arguments of ``FasterRCNN``).
        mask_roi_pool, mask_head, mask_predictor: the optional mask branch (all three or none).

    Forward:
        ``(features, proposals, image_shapes, targets=None) -> (detections, losses)`` as ``RoIHeads``:
        in training ``detections`` is ``[]`` and ``losses`` holds the weighted per-stage losses (plus
        ``loss_mask``); in eval ``detections`` holds one dict per image with ``boxes [N, 4]``,
        ``labels [N]``, ``scores [N]`` (and ``masks [N, 1, 28, 28]`` probabilities) and ``losses`` is ``{}``.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_heads: Sequence[nn.Module],
        box_predictors: Sequence[nn.Module],
        *,
        iou_thresholds: Sequence[float] = CASCADE_IOUS,
        bbox_reg_weights: Sequence[Sequence[float]] = CASCADE_WEIGHTS,
        stage_loss_weights: Sequence[float] = CASCADE_LOSS_WEIGHTS,
        class_agnostic: bool = True,
        score_mean: Literal["probs", "logits"] = "probs",
        box_loss: Literal["smooth_l1", "giou"] = "smooth_l1",
        box_loss_weight: float = 1.0,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        mask_roi_pool: nn.Module | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        n = len(box_heads)
        lengths = {len(box_predictors), len(iou_thresholds), len(bbox_reg_weights), len(stage_loss_weights)}
        if n == 0 or lengths != {n}:
            raise ValueError(
                f"one box head, predictor, IoU threshold, box-coder weight set and loss weight per stage: "
                f"got {n} heads, {len(box_predictors)} predictors, {len(iou_thresholds)} thresholds, "
                f"{len(bbox_reg_weights)} weight sets, {len(stage_loss_weights)} loss weights"
            )
        if score_mean not in ("probs", "logits"):
            raise ValueError(f"score_mean must be 'probs' or 'logits', not {score_mean!r}")
        if box_loss not in ("smooth_l1", "giou"):
            raise ValueError(f"box_loss must be 'smooth_l1' or 'giou', not {box_loss!r}")
        if box_loss == "giou" and not class_agnostic:
            raise ValueError("box_loss='giou' needs class_agnostic=True (one decoded box per RoI)")
        masks = (mask_roi_pool, mask_head, mask_predictor)
        if any(m is None for m in masks) and any(m is not None for m in masks):
            raise ValueError("give all of mask_roi_pool, mask_head and mask_predictor, or none")
        self.box_roi_pool = box_roi_pool
        self.box_heads = nn.ModuleList(box_heads)
        self.box_predictors = nn.ModuleList(box_predictors)
        self.matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in iou_thresholds]
        self.box_coders = [det_utils.BoxCoder(tuple(float(v) for v in w)) for w in bbox_reg_weights]
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(
            batch_size_per_image, positive_fraction
        )
        self.stage_loss_weights = [float(w) for w in stage_loss_weights]
        self.class_agnostic = bool(class_agnostic)
        self.score_mean = score_mean
        self.box_loss, self.box_loss_weight = box_loss, float(box_loss_weight)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    def has_mask(self) -> bool:
        """Whether the mask branch is present (torchvision's ``RoIHeads.has_mask``)."""
        return self.mask_predictor is not None

    # -- training: sampling -----------------------------------------------------------------------
    def sample(
        self, stage: int, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> tuple[
        list[torch.Tensor],
        list[torch.Tensor],
        list[torch.Tensor],
        list[torch.Tensor],
        list[torch.Tensor],
        list[torch.Tensor],
    ]:
        """``RoIHeads.select_training_samples`` at stage ``stage``'s IoU threshold and box coder.

        Returns:
            per image: sampled proposals, whether each is an appended ground-truth box, matched GT index,
            label (0 = background), regression targets, matched GT box (meaningless where label is 0).
        """
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        is_gt = [
            torch.cat(
                [
                    torch.zeros(len(p), dtype=torch.bool, device=device),
                    torch.ones(len(g), dtype=torch.bool, device=device),
                ]
            )
            for p, g in zip(proposals, gt_boxes, strict=True)
        ]
        proposals = [torch.cat((p, g)) for p, g in zip(proposals, gt_boxes, strict=True)]
        matcher = self.matchers[stage]
        matched_idxs, labels = [], []
        for props, boxes, cls in zip(proposals, gt_boxes, gt_labels, strict=True):
            if boxes.numel() == 0:  # background image
                matched = torch.zeros((props.shape[0],), dtype=torch.int64, device=device)
                lab = torch.zeros((props.shape[0],), dtype=torch.int64, device=device)
            else:
                idx = matcher(box_ops.box_iou(boxes, props))
                matched = idx.clamp(min=0)
                lab = cls[matched].to(dtype=torch.int64)
                lab[idx == matcher.BELOW_LOW_THRESHOLD] = 0
                lab[idx == matcher.BETWEEN_THRESHOLDS] = -1  # ignored by the sampler
            matched_idxs.append(matched)
            labels.append(lab)
        pos, neg = self.fg_bg_sampler(labels)
        matched_gt = []
        for i in range(len(proposals)):
            keep = torch.where(pos[i] | neg[i])[0]
            proposals[i], labels[i] = proposals[i][keep], labels[i][keep]
            matched_idxs[i], is_gt[i] = matched_idxs[i][keep], is_gt[i][keep]
            boxes = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype, device=device)
            matched_gt.append(boxes[matched_idxs[i]])
        regression_targets = self.box_coders[stage].encode(matched_gt, proposals)
        return proposals, is_gt, matched_idxs, labels, regression_targets, matched_gt

    def giou_loss(
        self,
        stage: int,
        box_regression: torch.Tensor,
        proposals: list[torch.Tensor],
        labels: list[torch.Tensor],
        matched_gt: list[torch.Tensor],
    ) -> torch.Tensor:
        """GIoU loss of the positives' decoded boxes against their matched ground truth, summed and
        divided by the sampled RoI count (mmdet's ``avg_factor``); unweighted."""
        labels_cat = torch.cat(labels)
        pos = torch.where(labels_cat > 0)[0]
        boxes = self.box_coders[stage].decode_single(box_regression[pos], torch.cat(proposals)[pos])
        loss = generalized_box_iou_loss(boxes, torch.cat(matched_gt)[pos], reduction="sum")
        return loss / labels_cat.numel()

    # -- refinement and inference -----------------------------------------------------------------
    def decode(self, stage: int, box_regression: torch.Tensor, proposals: list[torch.Tensor]) -> torch.Tensor:
        """Stage ``stage``'s boxes ``[N, K, 4]`` (``K`` = 1 when class-agnostic) for all proposals."""
        return self.box_coders[stage].decode(box_regression, proposals)

    def refine(
        self,
        stage: int,
        box_regression: torch.Tensor,
        class_logits: torch.Tensor,
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        labels: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """The next stage's proposals: this stage's boxes, one per RoI, clipped and detached.

        Class-specific regression picks the GT label's deltas where ``labels`` > 0 (training) and the
        arg-max foreground class otherwise, as mmdet's ``regress_by_class``.
        """
        boxes = self.decode(stage, box_regression, proposals)
        if self.class_agnostic:
            boxes = boxes[:, 0]
        else:
            cls = class_logits[:, 1:].argmax(dim=1) + 1
            if labels is not None:
                lab = torch.cat(labels)
                cls = torch.where(lab > 0, lab, cls)
            boxes = boxes[torch.arange(len(boxes), device=boxes.device), cls]
        out = boxes.detach().split([len(p) for p in proposals])
        return [box_ops.clip_boxes_to_image(b, s) for b, s in zip(out, image_shapes, strict=True)]

    def postprocess_detections(
        self,
        scores: torch.Tensor,
        pred_boxes: torch.Tensor,
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``RoIHeads.postprocess_detections`` from class probabilities ``[N, K]`` and boxes ``[N, K, 4]``:
        drop background, threshold, remove tiny boxes, per-class NMS, keep the top ``detections_per_img``."""
        num_classes = scores.shape[-1]
        per_image = [len(p) for p in proposals]
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, sc, shape in zip(
            pred_boxes.split(per_image), scores.split(per_image), image_shapes, strict=True
        ):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            labels = torch.arange(num_classes, device=sc.device).view(1, -1).expand_as(sc)
            boxes, sc, labels = boxes[:, 1:].reshape(-1, 4), sc[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            inds = torch.where(sc > self.score_thresh)[0]
            boxes, sc, labels = boxes[inds], sc[inds], labels[inds]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, sc, labels = boxes[keep], sc[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, sc, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(sc[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """See the class docstring."""
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None in training mode")
            for t in targets:
                if not t["boxes"].is_floating_point():
                    raise TypeError(f"target boxes must be of float type, not {t['boxes'].dtype}")
                if t["labels"].dtype != torch.int64:
                    raise TypeError(f"target labels must be of int64 type, not {t['labels'].dtype}")
                if self.has_mask() and "masks" not in t:
                    raise ValueError("every target needs a 'masks' entry for a mask head")
        losses: dict[str, torch.Tensor] = {}
        stage_logits: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        matched_idxs: list[torch.Tensor] = []
        box_regression = torch.empty(0)
        for k in range(self.num_stages):
            if self.training:
                assert targets is not None
                proposals, is_gt, matched_idxs, labels, regression_targets, matched_gt = self.sample(
                    k, proposals, targets
                )
            x = self.box_heads[k](self.box_roi_pool(features, proposals, image_shapes))
            class_logits, box_regression = self.box_predictors[k](x)
            last = k == self.num_stages - 1
            if self.training:
                if self.box_loss == "giou":
                    loss_cls = F.cross_entropy(class_logits, torch.cat(labels, dim=0))
                    loss_box = self.giou_loss(k, box_regression, proposals, labels, matched_gt)
                elif self.class_agnostic:
                    loss_cls = F.cross_entropy(class_logits, torch.cat(labels, dim=0))
                    loss_box = agnostic_box_loss(box_regression, labels, regression_targets)
                else:
                    loss_cls, loss_box = fastrcnn_loss(
                        class_logits, box_regression, labels, regression_targets
                    )
                w = self.stage_loss_weights[k]
                losses[f"loss_classifier_s{k}"] = w * loss_cls
                losses[f"loss_box_reg_s{k}"] = w * self.box_loss_weight * loss_box
                if not last:  # refine the sampled RoIs, minus the appended GT boxes (re-added next stage)
                    refined = self.refine(k, box_regression, class_logits, proposals, image_shapes, labels)
                    proposals = [r[~g] for r, g in zip(refined, is_gt, strict=True)]
            else:
                stage_logits.append(class_logits)
                if not last:
                    proposals = self.refine(k, box_regression, class_logits, proposals, image_shapes)

        result: list[dict[str, torch.Tensor]] = []
        if not self.training:
            if self.score_mean == "logits":
                scores = F.softmax(sum(stage_logits) / len(stage_logits), -1)
            else:
                scores = sum(F.softmax(s, -1) for s in stage_logits) / len(stage_logits)
            boxes = self.decode(self.num_stages - 1, box_regression, proposals)
            if self.class_agnostic:
                boxes = boxes.expand(-1, scores.shape[-1], -1)
            for b, s, lab in zip(
                *self.postprocess_detections(scores, boxes, proposals, image_shapes), strict=True
            ):
                result.append({"boxes": b, "labels": lab, "scores": s})

        if self.has_mask():
            losses.update(
                self.mask_forward(features, proposals, image_shapes, targets, result, labels, matched_idxs)
            )
        return result, losses

    def mask_forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None,
        result: list[dict[str, torch.Tensor]],
        labels: list[torch.Tensor],
        matched_idxs: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The mask branch on the last stage, as in ``RoIHeads.forward``: the loss in training (on the
        sampled positive RoIs), else ``masks`` added to each result dict."""
        assert (
            self.mask_roi_pool is not None and self.mask_head is not None and self.mask_predictor is not None
        )
        if self.training:
            pos = [torch.where(lab > 0)[0] for lab in labels]
            mask_proposals = [p[i] for p, i in zip(proposals, pos, strict=True)]
            pos_matched = [m[i] for m, i in zip(matched_idxs, pos, strict=True)]
        else:
            mask_proposals = [r["boxes"] for r in result]
        x = self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
        mask_logits = self.mask_predictor(x)
        if self.training:
            assert targets is not None
            gt_masks = [t["masks"] for t in targets]
            gt_labels = [t["labels"] for t in targets]
            return {"loss_mask": maskrcnn_loss(mask_logits, mask_proposals, gt_masks, gt_labels, pos_matched)}
        for prob, r in zip(
            maskrcnn_inference(mask_logits, [r["labels"] for r in result]), result, strict=True
        ):
            r["masks"] = prob
        return {}
