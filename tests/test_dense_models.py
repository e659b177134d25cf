"""Detection models: necks, Mask R-CNN, Cascade heads (CPU, tiny random timm models, 96-128 px).

The known answer for :class:`CascadeRoIHeads` is torchvision's own ``RoIHeads``: configured as one stage
with its settings, the cascade must reproduce its sampler draws, losses, detections and masks exactly.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads

from bobench import create_backbone
from bobench.backbones import timm_source
from bobench.dense.cascade import CascadeRoIHeads
from bobench.dense.heads import DetectorConfig, build_detector
from bobench.dense.neck import BATCH_NORMS, BackboneFPN, SimpleFeaturePyramid, to_nominal_size

SLIM = DetectorConfig(
    heads="slim",
    fpn_channels=32,
    min_size=96,
    max_size=96,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50,
    rpn_batch_size_per_image=64,
    box_batch_size_per_image=64,
)


def synthetic_batch(size: int = 96) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images with 1 and 2 bright rectangles, their boxes, labels (1, 2) and masks."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for rects in ([(10, 12, 50, 60)], [(5, 5, 40, 30), (50, 40, 90, 85)]):
        img = torch.rand(3, size, size, generator=g) * 0.2
        masks = torch.zeros(len(rects), size, size, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(rects):
            img[j, y0:y1, x0:x1] = 0.9
            masks[j, y0:y1, x0:x1] = 1
        images.append(img)
        labels = torch.tensor([1 + j % 2 for j in range(len(rects))], dtype=torch.int64)
        targets.append({"boxes": torch.tensor(rects, dtype=torch.float32), "labels": labels, "masks": masks})
    return images, targets


def shapes(maps: OrderedDict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in maps.items()}


# -- necks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [96, 128])
def test_vit_gets_learned_simple_pyramid(size: int) -> None:
    neck = BackboneFPN(create_backbone("random/timm:test_vit"), out_channels=32)
    assert isinstance(neck.pyramid, SimpleFeaturePyramid) and neck.strides == [4, 8, 16, 32, 64]
    out = neck(torch.zeros(2, 3, size, size))
    assert list(out) == ["0", "1", "2", "3", "pool"] and neck.out_channels == 32
    assert shapes(out) == {
        name: (2, 32, size // s, size // s)
        for name, s in zip(["0", "1", "2", "3"], [4, 8, 16, 32], strict=True)
    } | {"pool": (2, 32, -(size // -64), -(size // -64))}
    # ViTDet's layers: two deconvs (LN + GELU between) for stride 4, one for 8, identity, max-pool for 32
    kinds = [[type(m).__name__ for m in stage] for stage in neck.pyramid.scales]
    assert kinds[0][:4] == ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d"]
    assert kinds[1][0] == "ConvTranspose2d" and kinds[2][0] == "Conv2d" and kinds[3][0] == "MaxPool2d"


def test_patch14_vit_is_padded_and_resized_to_stride_16() -> None:
    backbone = timm_source.build("test_vit", pretrained=False, patch_size=14)
    neck = BackboneFPN(backbone, out_channels=32)
    assert neck.input_multiple == 14
    # 128 px (a detector batch padded to 32) is no multiple of 14: padded to 140 (grid 10), the adapter's
    # stride-16 map (ceil(140/16) = 9) is cropped to ceil(128/16) = 8, so every level has its nominal size
    out = neck(torch.zeros(2, 3, 128, 128))
    assert [v.shape[-1] for v in out.values()] == [32, 16, 8, 4, 2]
    # 112 px: a 8x8 token grid, resized by the adapter to 7x7 = 112/16
    assert [v.shape[-1] for v in neck(torch.zeros(1, 3, 112, 112)).values()] == [28, 14, 7, 3, 2]


def test_cnn_fpn_levels_and_off_by_one_sizes() -> None:
    neck = BackboneFPN(create_backbone("random/timm:resnet18"), out_channels=48)
    assert neck.strides == [4, 8, 16, 32, 64] and neck.featmap_names == ["0", "1", "2", "3"]
    assert shapes(neck(torch.zeros(2, 3, 96, 96))) == {
        "0": (2, 48, 24, 24),
        "1": (2, 48, 12, 12),
        "2": (2, 48, 6, 6),
        "3": (2, 48, 3, 3),
        "pool": (2, 48, 2, 2),
    }
    # a size that is no multiple of 32: ceil/floor conventions differ per family; the FPN's top-down
    # interpolation to each lateral's size absorbs them
    assert [v.shape[-1] for v in neck(torch.zeros(1, 3, 100, 100)).values()] == [25, 13, 7, 4, 2]
    convnext = BackboneFPN(create_backbone("random/timm:test_convnext"), out_channels=32)
    assert [v.shape[-1] for v in convnext(torch.zeros(1, 3, 100, 100)).values()] == [25, 12, 6, 3, 2]


def test_to_nominal_size_only_fixes_non_rounding_mismatches() -> None:
    fmap = torch.zeros(1, 4, 13, 12)
    assert to_nominal_size(fmap, (100, 100), 8) is fmap  # ceil 13 / floor 12: left alone
    assert to_nominal_size(torch.zeros(1, 4, 8, 8), (112, 112), 14).shape[-2:] == (7, 7)  # 14 → 16


def batchnorm_stats(module: torch.nn.Module) -> list[torch.Tensor]:
    return [
        t.clone()
        for m in module.modules()
        if isinstance(m, BATCH_NORMS)
        for t in (m.running_mean, m.running_var)
    ]


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_and_norm_eval(frozen: bool) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("random/timm:test_resnet")
    det = build_detector(backbone, 3, SLIM, frozen=frozen)
    det.train()
    weights = [p.detach().clone() for p in backbone.parameters()]
    stats = batchnorm_stats(backbone)
    assert stats and all(not m.training for m in backbone.modules() if isinstance(m, BATCH_NORMS))
    opt = torch.optim.SGD([p for p in det.parameters() if p.requires_grad], lr=0.01)
    images, targets = synthetic_batch()
    sum(det(images, targets).values()).backward()
    opt.step()
    for before, after in zip(stats, batchnorm_stats(backbone), strict=True):
        assert torch.equal(before, after)  # BN statistics never move (frozen, and norm_eval)
    changed = [not torch.equal(a, b) for a, b in zip(weights, backbone.parameters(), strict=True)]
    if frozen:
        assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
        assert not any(changed) and not backbone.training
    else:
        assert all(p.requires_grad for p in backbone.parameters()) and any(changed)
        assert backbone.training  # only the BatchNorms are held in eval


# -- the cascade against torchvision's RoIHeads ---------------------------------------------------------
def one_stage_pair() -> tuple[RoIHeads, CascadeRoIHeads]:
    torch.manual_seed(0)
    det = build_detector(create_backbone("random/timm:test_resnet"), 4, SLIM, kind="mask_rcnn")
    rh = det.roi_heads
    rh.score_thresh = 0.0  # random heads score near 1/num_classes: keep many detections to compare
    cascade = CascadeRoIHeads(
        rh.box_roi_pool,
        [copy.deepcopy(rh.box_head)],
        [copy.deepcopy(rh.box_predictor)],
        iou_thresholds=(0.5,),
        bbox_reg_weights=((10.0, 10.0, 5.0, 5.0),),
        stage_loss_weights=(1.0,),
        class_agnostic=False,
        batch_size_per_image=64,
        score_thresh=0.0,
        mask_roi_pool=rh.mask_roi_pool,
        mask_head=copy.deepcopy(rh.mask_head),
        mask_predictor=copy.deepcopy(rh.mask_predictor),
    )
    return rh, cascade


def roi_inputs() -> tuple[OrderedDict[str, torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
    g = torch.Generator().manual_seed(1)
    feats = OrderedDict(
        (str(i), torch.randn(2, 32, 96 // s, 96 // s, generator=g)) for i, s in enumerate([4, 8, 16, 32])
    )
    feats["pool"] = feats["3"][..., ::2, ::2]
    xy = torch.rand(2, 60, 2, generator=g) * 70
    wh = torch.rand(2, 60, 2, generator=g) * 40 + 4
    proposals = list(torch.cat([xy, (xy + wh).clamp(max=96)], dim=-1))
    return feats, proposals, [(96, 96), (96, 96)]


def test_one_stage_cascade_equals_torchvision_roi_heads() -> None:
    rh, cascade = one_stage_pair()
    feats, proposals, image_shapes = roi_inputs()
    _, targets = synthetic_batch()
    rh.train()
    cascade.train()
    torch.manual_seed(7)
    _, ref = rh(feats, [p.clone() for p in proposals], image_shapes, targets)
    torch.manual_seed(7)
    _, got = cascade(feats, [p.clone() for p in proposals], image_shapes, targets)
    assert sorted(got) == ["loss_box_reg_s0", "loss_classifier_s0", "loss_mask"]
    for name in ("loss_classifier", "loss_box_reg", "loss_mask"):
        assert torch.equal(got.get(name + "_s0", got.get(name)), ref[name]), name
    assert ref["loss_box_reg"] > 0 and ref["loss_mask"] > 0  # positives were sampled and matched

    rh.eval()
    cascade.eval()
    with torch.no_grad():
        ref_det, _ = rh(feats, proposals, image_shapes)
        got_det, losses = cascade(feats, proposals, image_shapes)
    assert losses == {} and all(len(r["boxes"]) > 10 for r in ref_det)
    for r, c in zip(ref_det, got_det, strict=True):
        assert r.keys() == c.keys() == {"boxes", "labels", "scores", "masks"}
        for key in r:
            assert torch.equal(r[key], c[key]), key


def test_identical_zero_regression_stages_equal_one_stage() -> None:
    """Two copies of one stage whose second regresses nothing: the stage-mean score equals the single
    stage's and the boxes barely move (decode of zero deltas), so the detections match to float error."""
    _, one = one_stage_pair()
    two = copy.deepcopy(one)
    two.box_heads.append(copy.deepcopy(one.box_heads[0]))
    two.box_predictors.append(copy.deepcopy(one.box_predictors[0]))
    with torch.no_grad():
        two.box_predictors[0].bbox_pred.weight.zero_()
        two.box_predictors[0].bbox_pred.bias.zero_()
    two.matchers *= 2
    two.box_coders *= 2
    two.stage_loss_weights = [1.0, 0.5]
    feats, proposals, image_shapes = roi_inputs()
    one.eval()
    two.eval()
    with torch.no_grad():
        ref, _ = one(feats, proposals, image_shapes)
        got, _ = two(feats, proposals, image_shapes)
    for r, c in zip(ref, got, strict=True):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(c[key], r[key], rtol=1e-5, atol=1e-4)
    two.train()
    _, targets = synthetic_batch()
    losses = two(feats, proposals, image_shapes, targets)[1]
    assert sorted(losses) == [
        "loss_box_reg_s0",
        "loss_box_reg_s1",
        "loss_classifier_s0",
        "loss_classifier_s1",
        "loss_mask",
    ]


# -- whole detectors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("random/timm:test_resnet", "mask_rcnn"),
        ("random/timm:test_vit", "cascade_mask_rcnn"),  # smooth L1 (BoB's ViT configs)
        ("random/timm:test_resnet", "cascade_mask_rcnn"),  # GIoU x10 (BoB's CNN configs)
    ],
)
def test_detector_overfits_a_batch_and_predicts(spec: str, kind: str) -> None:
    torch.manual_seed(0)
    det = build_detector(create_backbone(spec), 3, SLIM, kind=kind)
    images, targets = synthetic_batch()
    opt = torch.optim.AdamW([p for p in det.parameters() if p.requires_grad], lr=1e-3)
    det.train()
    totals = []
    for _ in range(10):
        losses = det(images, targets)
        assert all(torch.isfinite(v) for v in losses.values())
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert sum(totals[-3:]) < 0.85 * sum(totals[:3]), totals
    stage_keys = (
        {"loss_classifier_s2", "loss_box_reg_s2"} if kind.startswith("cascade") else {"loss_classifier"}
    )
    assert stage_keys <= losses.keys() and "loss_mask" in losses

    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2
    for r in out:
        n = len(r["boxes"])
        assert r["boxes"].shape == (n, 4) and r["labels"].dtype == torch.int64 and r["scores"].shape == (n,)
        assert r["masks"].shape == (n, 1, 96, 96)
        assert ((r["labels"] >= 1) & (r["labels"] <= 2)).all()


def test_full_4conv1fc_cascade_builds_and_runs() -> None:
    torch.manual_seed(0)
    det = build_detector(
        create_backbone("random/timm:test_convnext"), 3, SLIM, kind="cascade_mask_rcnn", heads="4conv1fc"
    )
    rh = det.roi_heads
    assert rh.num_stages == 3 and rh.box_predictors[0].bbox_pred.out_features == 4  # class-agnostic
    assert [c.weights for c in rh.box_coders] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert len(rh.box_heads[0]) == 7 and rh.box_heads[0][-2].out_features == 1024  # 4 conv, flatten, fc, relu
    assert len(det.rpn.head.conv) == 2 and len(rh.mask_head) == 4
    images, targets = synthetic_batch()
    det.train()
    losses = det(images, targets)
    assert len(losses) == 9 and all(torch.isfinite(v) for v in losses.values())
    det.eval()
    with torch.no_grad():
        assert det(images)[0].keys() >= {"boxes", "labels", "scores", "masks"}


def test_faster_kinds_and_config_errors() -> None:
    backbone = create_backbone("random/timm:test_resnet")
    det = build_detector(backbone, 2, SLIM, kind="cascade_rcnn")
    assert not det.roi_heads.has_mask()
    assert det.transform.image_mean == backbone.preprocess()["mean"]
    with pytest.raises(ValueError, match="fpn_channels"):
        build_detector(backbone, 2, fpn_chanels=32)
    with pytest.raises(ValueError, match="kind"):
        build_detector(backbone, 2, kind="retinanet")
    with pytest.raises(ValueError, match="background"):
        build_detector(backbone, 1)


def test_bob_head_norm_and_box_loss_per_backbone() -> None:
    from timm.layers import LayerNorm2d

    full = dict(kind="cascade_mask_rcnn", heads="4conv1fc")
    cnn = build_detector(create_backbone("random/timm:test_convnext"), 3, SLIM, **full).roi_heads
    vit = build_detector(create_backbone("random/timm:test_vit"), 3, SLIM, **full).roi_heads
    assert (cnn.box_loss, cnn.box_loss_weight, vit.box_loss, vit.box_loss_weight) == (
        "giou",
        10.0,
        "smooth_l1",
        1.0,
    )
    norms = {name: {type(m) for m in rh.modules() if isinstance(m, torch.nn.BatchNorm2d | LayerNorm2d)}
             for name, rh in (("cnn", cnn), ("vit", vit))}  # fmt: skip
    assert norms == {"cnn": {torch.nn.BatchNorm2d}, "vit": {LayerNorm2d}}
    forced = build_detector(create_backbone("random/timm:test_vit"), 3, SLIM, box_loss="giou", head_norm="batch",
                            **full).roi_heads  # fmt: skip
    assert forced.box_loss == "giou" and not any(isinstance(m, LayerNorm2d) for m in forced.modules())
    with pytest.raises(ValueError, match="class-agnostic cascade"):
        build_detector(create_backbone("random/timm:test_resnet"), 3, SLIM, kind="mask_rcnn", box_loss="giou")


def test_giou_loss_by_hand() -> None:
    """Proposal [0, 0, 10, 10], zero deltas, matched to [5, 0, 15, 10]: IoU 50 / 150, the enclosing box is
    the union, so GIoU = 1/3 and the loss 2/3; one positive among two sampled RoIs halves it."""
    _, cascade = one_stage_pair()
    proposals = [torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])]
    labels = [torch.tensor([1, 0])]
    matched = [torch.tensor([[5.0, 0, 15, 10], [0, 0, 1, 1]])]
    loss = cascade.giou_loss(0, torch.zeros(2, 4), proposals, labels, matched)
    assert loss.item() == pytest.approx((2 / 3) / 2, abs=1e-6)
