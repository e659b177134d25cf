"""Semantic segmentation: heads, the model wrapper, slide / multi-scale inference, metrics.

Models run on the CPU with tiny random timm backbones at 64-100 px. Known answers: a pixelwise (1x1 conv)
model, for which sliding windows and flips must change nothing; torchmetrics as a second implementation
of the metrics; hand-computed IoUs.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from bobench import create_backbone
from bobench.dense.neck import BATCH_NORMS
from bobench.dense.seg_metrics import ConfusionMatrix
from bobench.dense.segmentation import (
    LinearHead,
    SegmentationModel,
    UPerNetHead,
    build_segmenter,
    multiscale_flip_inference,
    slide_inference,
)
from test_dense_models import batchnorm_stats

RESNET, CONVNEXT, VIT = "random/timm:test_resnet", "random/timm:test_convnext", "random/timm:test_vit"
HEADS = {
    "linear-last": dict(head="linear", maps="last"),
    "linear-all": dict(head="linear", maps="all"),
    "upernet": dict(head="upernet", channels=16),
}


def segmenter(spec: str, head: str = "upernet", n_classes: int = 5, **kw) -> SegmentationModel:
    torch.manual_seed(0)
    return build_segmenter(create_backbone(spec), n_classes, **(HEADS[head] | kw))


def images(size: int | tuple[int, int], n: int = 2, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# -- models ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize(
    ("spec", "last_stride"),
    [(RESNET, 32), (CONVNEXT, 32), (VIT, 16)],  # a ViT's "last" is its token map
)
def test_shapes(spec: str, last_stride: int, head: str) -> None:
    seg = segmenter(spec, head).eval()
    info = seg.backbone.feature_info
    strides = [info[i].stride for i in seg.in_index]
    assert strides == ([last_stride] if head == "linear-last" else [4, 8, 16, 32])
    channels = sum(info[i].channels for i in seg.in_index)
    if head != "upernet":
        assert seg.head.bn.num_features == channels and seg.head.classifier.in_channels == channels
    with torch.no_grad():
        for size in (64, 72, 100):  # 72 and 100: no multiple of 32; the ViT pads them to 80 and 112
            x = images(size)
            assert seg(x).shape == (2, 5, size, size)
            maps = seg.backbone_maps(x)
            # logits come out at the finest selected map's resolution (stride 4, or the last map's)
            assert seg.head(maps).shape[-2:] == maps[0].shape[-2:]
            side, s = seg.padded_size((size, size))[1], strides[0]
            assert maps[0].shape[-1] in (side // s, -(-side // s))  # floor (ConvNeXt) or ceil (ResNet)


def test_non_square_and_padding() -> None:
    seg = segmenter(VIT, "linear-last").eval()
    assert seg.input_multiple == 16 and seg.padded_size((72, 100)) == (80, 112)
    x = images((72, 100), n=1)
    padded = seg.backbone_input(x)
    assert padded.shape[-2:] == (80, 112) and torch.equal(padded[..., 72:, :], torch.zeros(1, 3, 8, 112))
    with torch.no_grad():
        assert seg(x).shape == (1, 5, 72, 100)


@pytest.mark.parametrize(("spec", "size"), [(RESNET, 72), (CONVNEXT, 100), (VIT, 72)])
@pytest.mark.parametrize("head", ["linear-all", "upernet"])
def test_forward_equals_forward_maps(spec: str, size: int, head: str) -> None:
    seg = segmenter(spec, head).eval()
    x = images(size)
    with torch.no_grad():
        out = seg(x)
        every = seg.backbone.features(seg.backbone_input(x))  # what a protocol caching all maps stores
        assert torch.equal(seg.forward_maps(every, (size, size)), out)
        assert torch.equal(seg.forward_maps(seg.backbone_maps(x), (size, size)), out)
        # a half-precision cache is cast to the head's dtype
        half = seg.forward_maps([m.half() for m in every], (size, size))
        assert half.dtype == torch.float32 and torch.allclose(half, out, atol=1e-2)
    with pytest.raises(ValueError, match="pass all 4 backbone maps"):
        seg.forward_maps(every[:-1], (size, size))


def test_linear_head_on_cached_last_map() -> None:
    seg = segmenter(RESNET, "linear-last").eval()
    x = images(64)
    with torch.no_grad():
        (last,) = seg.backbone_maps(x)
        assert last.shape == (2, 96, 2, 2)  # what a frozen linear protocol caches: [B, C, H/32, W/32]
        assert torch.equal(seg.forward_maps([last], (64, 64)), seg(x))


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_trains_only_the_head(frozen: bool) -> None:
    seg = segmenter(RESNET, "upernet", frozen=frozen).train()
    backbone = seg.backbone
    weights = [p.detach().clone() for p in backbone.parameters()]
    head = [p.detach().clone() for p in seg.head.parameters()]
    stats = batchnorm_stats(backbone)
    assert stats and all(not m.training for m in backbone.modules() if isinstance(m, BATCH_NORMS))
    opt = torch.optim.SGD([p for p in seg.parameters() if p.requires_grad], lr=0.1)
    target = torch.randint(0, 5, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(seg(images(64)), target).backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(head, seg.head.parameters(), strict=True))
    for before, after in zip(stats, batchnorm_stats(backbone), strict=True):
        assert torch.equal(before, after)  # frozen, or norm_eval: BN statistics never move
    changed = [not torch.equal(a, b) for a, b in zip(weights, backbone.parameters(), strict=True)]
    if frozen:
        assert not any(changed) and not backbone.training
        assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    else:
        assert any(changed) and backbone.training  # only the BatchNorms are held in eval


@pytest.mark.parametrize(("spec", "head"), [(RESNET, "upernet"), (VIT, "linear-all")])
def test_overfits_a_two_class_batch(spec: str, head: str) -> None:
    seg = segmenter(spec, head, n_classes=2, frozen=False).train()
    x = torch.full((4, 3, 64, 64), 0.2)
    target = torch.zeros(4, 64, 64, dtype=torch.int64)
    for i, (y0, x0) in enumerate([(8, 8), (20, 30), (30, 4), (36, 36)]):
        x[i, :, y0 : y0 + 24, x0 : x0 + 24] = 0.9
        target[i, y0 : y0 + 24, x0 : x0 + 24] = 1
    target[:, :2] = 255  # an unlabelled band the loss ignores
    opt = torch.optim.AdamW([p for p in seg.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(seg(x), target, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_build_errors() -> None:
    backbone = create_backbone(RESNET)
    with pytest.raises(ValueError, match="choose one of linear, upernet"):
        build_segmenter(backbone, 3, head="uper_net")
    with pytest.raises(ValueError, match="choose 'last', 'all'"):
        build_segmenter(backbone, 3, maps="first")
    with pytest.raises(ValueError, match=r"subset of 0\.\.3"):
        build_segmenter(backbone, 3, maps=[1, 4])
    with pytest.raises(ValueError, match="n_classes"):
        build_segmenter(backbone, 0)
    with pytest.raises(ValueError, match=r"expects maps of \(32,\) channels"):
        SegmentationModel(backbone, LinearHead([32], 3), in_index=[3])
    seg = SegmentationModel(backbone, UPerNetHead([48, 96], 3, channels=8), in_index=[1, -1])
    assert seg.in_index == (1, 3) and seg.frozen


# -- slide and multi-scale inference --------------------------------------------------------------------
def pixelwise(n_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(3, n_classes, 1).eval()


@pytest.mark.parametrize(
    ("window", "stride"), [(16, 10), ((20, 12), (7, 12)), (5, 5), ((37, 53), 1), (64, 8)]
)
def test_slide_inference_of_a_pixelwise_model_is_exact(window, stride) -> None:
    model, x = pixelwise(), images((37, 53))
    with torch.no_grad():
        got = slide_inference(model, x, 4, window, stride)  # (64, 8): the image is padded to the window
        torch.testing.assert_close(got, model(x), rtol=1e-6, atol=1e-6)


def test_slide_inference_with_whole_window_equals_whole_inference() -> None:
    with torch.no_grad():
        seg, x = segmenter(RESNET).eval(), images((64, 72))
        assert torch.equal(slide_inference(seg, x, 5, (64, 72), 32), seg(x))
        # a 72 px image in an 80 px window: padded with the card's mean, i.e. the zeros the ViT's own
        # padding to a multiple of 16 adds after normalisation, so the result is the same
        vit, x = segmenter(VIT).eval(), images(72)
        assert vit.pad_value == (0.5, 0.5, 0.5)
        assert torch.equal(slide_inference(vit, x, 5, 80, 40), vit(x))
        sliding = slide_inference(seg, images(96), 5, 64, 32)
        assert sliding.shape == (2, 5, 96, 96) and sliding.dtype == torch.float32


def test_slide_inference_errors() -> None:
    with pytest.raises(ValueError, match="exceeds window"):
        slide_inference(pixelwise(), images(32), 4, 16, 17)
    with pytest.raises(ValueError, match="model returned"):
        slide_inference(pixelwise(3), images(32), 4, 16, 8)


def test_multiscale_flip() -> None:
    model, x = pixelwise(), images((37, 53))
    with torch.no_grad():
        expected = model(x).softmax(1)
        torch.testing.assert_close(multiscale_flip_inference(model, x, scales=(1.0,), flip=False), expected)
        # a pixelwise model commutes with flips: un-flipping the logits must give the same probabilities
        torch.testing.assert_close(multiscale_flip_inference(model, x, scales=(1.0,)), expected)
        sizes = []

        def recording(img: torch.Tensor) -> torch.Tensor:
            sizes.append(tuple(img.shape[-2:]))
            return model(img)

        probs = multiscale_flip_inference(recording, x, scales=(0.5, 1.5))
    # round half up, as mmseg's keep-ratio resize: 18.5 → 19, 26.5 → 27, 55.5 → 56, 79.5 → 80
    assert sizes == [(19, 27), (19, 27), (56, 80), (56, 80)]
    assert probs.shape == (2, 4, 37, 53)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 37, 53))


# -- metrics --------------------------------------------------------------------------------------------
def test_confusion_matrix_hand_computed() -> None:
    target = torch.tensor([[0, 0, 1], [1, 255, 1]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 1]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    m = cm.compute()
    # counted (target, pred) pairs: (0,0) (0,1) (1,1) (1,2) (1,1); the ignored pixel's pred is dropped
    # class 0: TP 1, FP 0, FN 1 → 1/2;  class 1: TP 2, FP 1, FN 1 → 2/4;  class 2: TP 0, FP 1 → 0/1;
    # class 3: in neither → excluded.  mIoU = (1/2 + 1/2 + 0) / 3 = 1/3
    assert m["per_class_iou"][:3] == [0.5, 0.5, 0.0] and math.isnan(m["per_class_iou"][3])
    assert m["mIoU"] == pytest.approx(float((Fraction(1, 2) + Fraction(1, 2) + 0) / 3))
    # accuracy TP / GT: class 0 1/2, class 1 2/3; classes 2 and 3 absent from the ground truth → excluded
    assert m["mAcc"] == pytest.approx(float((Fraction(1, 2) + Fraction(2, 3)) / 2))
    assert m["pixel_acc"] == pytest.approx(3 / 5) and m["pixels"] == 5
    assert cm.mat.tolist() == [[1, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("seed", range(4))
def test_confusion_matrix_matches_torchmetrics(seed: int) -> None:
    k = 7
    g = torch.Generator().manual_seed(seed)
    # class 5 is only ever predicted, class 6 never occurs; ~10% of pixels unlabelled
    target = torch.randint(0, 5, (6, 19, 23), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.where(
        torch.rand(target.shape, generator=g) < 0.4, target, torch.randint(0, 6, target.shape, generator=g)
    )
    pred[target == 255] = torch.randint(0, k, pred[target == 255].shape, generator=g)
    cm = ConfusionMatrix(k)
    for i in range(0, 6, 2):  # accumulated over batches; torchmetrics sees the whole set at once
        cm.update(pred[i : i + 2], target[i : i + 2])
    m = cm.compute()
    # torchmetrics' "macro" gives weight 0 to classes absent from both pred and target (their row and
    # column sums are 0) and averages over the rest: mmseg's definition. zero_division only sets the value
    # those classes get before the weighting, so it must be a number (NaN * 0 would be NaN): keep 0.
    miou = MulticlassJaccardIndex(k, average="macro", ignore_index=255, zero_division=0.0)(pred, target)
    assert m["mIoU"] == pytest.approx(float(miou), abs=1e-6)
    per_class = MulticlassJaccardIndex(k, average="none", ignore_index=255, zero_division=math.nan)(
        pred, target
    )
    torch.testing.assert_close(
        torch.tensor(m["per_class_iou"], dtype=torch.float32), per_class, equal_nan=True
    )
    assert math.isnan(m["per_class_iou"][6]) and m["per_class_iou"][5] == 0.0
    acc = MulticlassAccuracy(k, average="micro", ignore_index=255)(pred, target)
    assert m["pixel_acc"] == pytest.approx(float(acc), abs=1e-6)
    # torchmetrics' macro accuracy would also average classes predicted but absent from the ground truth
    # (as 0); mmseg's mAcc averages only classes present in it, so compare the per-class values instead
    recall = MulticlassAccuracy(k, average="none", ignore_index=255)(pred, target)
    present = torch.bincount(target[target != 255], minlength=k) > 0
    assert m["mAcc"] == pytest.approx(float(recall[present].mean()), abs=1e-6)
    assert m["pixels"] == int((target != 255).sum())


def test_confusion_matrix_merge_dtypes_and_errors() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 20, (4, 16, 16), generator=g)
    pred = torch.randint(0, 20, (4, 16, 16), generator=g)
    whole = ConfusionMatrix(20)
    whole.update(pred, target)
    a, b = ConfusionMatrix(20), ConfusionMatrix(20)
    a.update(pred[:3].to(torch.uint8), target[:3].to(torch.uint8))  # uint8 maps: 19 * 20 overflows uint8
    b.update(pred[3:].int(), target[3:].int())
    assert torch.equal((a + b).mat, whole.mat) and not torch.equal(a.mat, whole.mat)
    assert torch.equal(a.merge(b).mat, whole.mat) and a.mat.dtype == torch.int64
    assert a.all_reduce() is a  # no process group: a no-op
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(ConfusionMatrix(20, ignore_index=None))
    with pytest.raises(ValueError, match="target holds label 20"):
        whole.update(torch.zeros(3, dtype=torch.int64), torch.tensor([0, 20, 255]))
    with pytest.raises(ValueError, match="pred holds label -1"):
        whole.update(torch.tensor([0, -1, 0]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer labels"):
        whole.update(torch.zeros(3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="differ in shape"):
        whole.update(torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    empty = ConfusionMatrix(3).compute()
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["pixel_acc"]) and empty["pixels"] == 0


def test_all_reduce_in_a_process_group(tmp_path) -> None:
    import torch.distributed as dist

    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2]))
    before = cm.mat.clone()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert torch.equal(cm.all_reduce().mat, before)  # the sum over one rank
    finally:
        dist.destroy_process_group()
