"""PISA losses of every head on hand-worked cases: fixed logits, deltas and targets in,
loss values computed here with plain arithmetic (not with the ops the heads call).

Conventions used below: all logits 0 unless stated; a GT box equal to its anchor/proposal
(so the regression target is 0); x-deltas move a box by `dx * width / wx` pixels.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from pisa.core.config import BoxLossConfig, CARLConfig, ISRPConfig, ModelConfig
from pisa.models import build_detector
from pisa.models.pisa_loss import PisaLoss, mean_over_workers
from pisa.models.retinanet import PISARetinaNetHead
from pisa.models.roi_heads import _Samples
from pisa.models.ssd import PISASSDHead

LN2 = math.log(2.0)
LN4 = math.log(4.0)


def smooth_l1(x: float, beta: float) -> float:
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def focal(x: float, target: int, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1.0 / (1.0 + math.exp(-x))
    p_t = p if target else 1.0 - p
    return -math.log(p_t) * (1.0 - p_t) ** gamma * (alpha if target else 1.0 - alpha)


# ---------------------------------------------------------------- two-stage


def _two_stage_heads(**cfg):
    model = build_detector(ModelConfig(backbone="resnet18_fpn", min_size=64, max_size=64, rois_per_image=8, **cfg), 3)
    return model.roi_heads


def _two_stage_case():
    """3 sampled RoIs of one image: P1 (class 1, on its GT), P2 (class 1, same GT, proposal
    twice as tall: IoU 0.5), N (background)."""
    gt = torch.tensor([0.0, 0.0, 10.0, 10.0])
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [30.0, 30.0, 40.0, 40.0]])
    labels = torch.tensor([1, 1, 0])
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    samples = _Samples(
        proposals=[proposals],
        matched_idxs=[torch.zeros(3, dtype=torch.long)],
        labels=labels,
        regression_targets=coder.encode_single(gt.expand(3, 4), proposals),
        gt_boxes=gt.expand(3, 4).clone(),
        gt_inds=torch.zeros(3, dtype=torch.long),
        label_weights=torch.ones(3),
    )
    logits = torch.zeros(3, 4)
    logits[1, 1] = math.log(3.0)  # P2: p(class 1) = 3 / 6 = 0.5, CE = ln 2; P1 and N: CE = ln 4
    deltas = torch.zeros(3, 16)
    deltas[0, 4:8] = torch.tensor([0.5, -2.0, 0.0, 0.0])  # P1's class-1 deltas; its target is 0
    return samples, logits.requires_grad_(), deltas.requires_grad_()


def test_two_stage_box_loss_beta_is_a_config_field():
    samples, logits, deltas = _two_stage_case()
    # P2's target: dy = 10 * (5 - 10) / 20 = -2.5, dh = 5 * ln(10 / 20); its deltas are 0
    p2 = [smooth_l1(-2.5, 1.0), smooth_l1(5.0 * math.log(0.5), 1.0)]
    p1 = [smooth_l1(0.5, 1.0), smooth_l1(-2.0, 1.0)]  # 0.125, 1.5
    ours = _two_stage_heads(box_loss={"type": "smooth_l1", "beta": 1.0}).pisa_box_loss(logits, deltas, samples)
    assert ours["loss_box_reg"].item() == pytest.approx((sum(p1) + sum(p2)) / 3, rel=1e-5)
    beta = 1.0 / 9.0  # unset: torchvision's
    default = _two_stage_heads().pisa_box_loss(logits, deltas, samples)
    expected = sum(smooth_l1(v, beta) for v in (0.5, -2.0, -2.5, 5.0 * math.log(0.5))) / 3
    assert default["loss_box_reg"].item() == pytest.approx(expected, rel=1e-5)
    assert ours["loss_classifier"].item() == pytest.approx((LN4 + LN2 + LN4) / 3, rel=1e-5)


def test_two_stage_isr_p_and_carl_by_hand():
    samples, logits, deltas = _two_stage_case()
    heads = _two_stage_heads(
        box_loss={"type": "smooth_l1", "beta": 1.0},
        isr_p={"enabled": True, "k": 2.0, "bias": 0.0},
        carl={"enabled": True, "k": 1.0, "bias": 0.2},
    )
    losses = heads.pisa_box_loss(logits, deltas, samples)
    # ISR-P: P1 (IoU 76/124) ranks first, P2 (IoU 0.5) second; 2 positives of class 1:
    # raw (2 - r) / 2 = 1, 0.5 -> squared 1, 0.25 -> rescaled to keep ln4 + ln2 = 3 ln2:
    ratio = 3 * LN2 / (1.0 * LN4 + 0.25 * LN2)  # = 4/3
    w1, w2 = ratio, 0.25 * ratio
    d = heads.pisa.record
    torch.testing.assert_close(d.isr_p_weights, torch.tensor([w1, w2]))
    assert d.iou_hlr.tolist() == [0, 1]
    torch.testing.assert_close(d.ious, torch.tensor([76 / 124, 0.5]))  # P1 moved by (0.5, -2) px
    # the loss value keeps the positives' total; the gradient moves to P1
    assert losses["loss_classifier"].item() == pytest.approx((LN4 + LN2 + LN4) / 3, rel=1e-5)
    losses["loss_classifier"].backward(retain_graph=True)
    expected_grad = w1 * (torch.full((4,), 0.25) - torch.tensor([0.0, 1, 0, 0])) / 3
    torch.testing.assert_close(logits.grad[0], expected_grad)
    # CARL: p = 0.25 (P1), 0.5 (P2); v = 0.2 + 0.8 p = 0.4, 0.6; c = 2 v / 1.0 = 0.8, 1.2
    reg1 = smooth_l1(0.5, 1.0) + smooth_l1(-2.0, 1.0)
    reg2 = smooth_l1(-2.5, 1.0) + smooth_l1(5.0 * math.log(0.5), 1.0)
    assert losses["loss_carl"].item() == pytest.approx((0.8 * reg1 + 1.2 * reg2) / 3, rel=1e-5)


# ---------------------------------------------------------------- RetinaNet


def _retina_case(dtype=torch.float32, scale: float = 1.0):
    """2 images x 3 anchors. Image 0: a0 positive (GT 0, class 1), a1 negative, a2 ignored.
    Image 1: b0 and b1 positives of the same GT (class 2), b2 negative."""
    box = torch.tensor([0.0, 0.0, 10.0, 10.0]) * scale
    far = torch.tensor([20.0, 20.0, 30.0, 30.0]) * scale
    anchors = [torch.stack([box, far, far]), torch.stack([box, box, far])]
    targets = [
        {"boxes": box[None].clone(), "labels": torch.tensor([1])},
        {"boxes": box[None].clone(), "labels": torch.tensor([2])},
    ]
    matched = [torch.tensor([0, -1, -2]), torch.tensor([0, 0, -1])]
    logits = torch.zeros(2, 3, 4)
    logits[1, 0, 2] = math.log(3.0)  # b0: p(class 2) = 0.75
    deltas = torch.zeros(2, 3, 4)
    deltas[0, 0, 0] = 0.05  # a0 moves 0.5 px: smooth-L1(0.05; 0.11) = 0.5 * 0.05^2 / 0.11
    deltas[1, 0, 0] = 0.2  # b0 moves 2 px: 0.2 - 0.055; IoU 80 / 120
    outputs = {
        "cls_logits": logits.requires_grad_(),
        "bbox_regression": deltas.to(dtype).requires_grad_(),
    }
    return targets, outputs, anchors, matched


def _retina_head(**kw) -> PISARetinaNetHead:
    return PISARetinaNetHead(8, 1, 4, ModelConfig(**kw))


def _retina_focal():
    pos0 = focal(0.0, 1) + 3 * focal(0.0, 0)  # 0.625 ln 2
    neg = 4 * focal(0.0, 0)  # 0.75 ln 2
    pos_b0 = focal(math.log(3.0), 1) + 3 * focal(0.0, 0)
    return pos0, neg, pos_b0


def test_retinanet_batch_normalisation_and_beta_by_hand():
    head = _retina_head(box_loss=BoxLossConfig(type="smooth_l1", beta=0.11))
    losses = head.compute_loss(*_retina_case())
    pos0, neg, pos_b0 = _retina_focal()
    # 3 positives in the batch; the ignored anchor a2 counts nowhere
    assert losses["classification"].item() == pytest.approx((pos0 + neg + pos_b0 + pos0 + neg) / 3, rel=1e-5)
    reg = smooth_l1(0.05, 0.11) + smooth_l1(0.2, 0.11)
    assert losses["bbox_regression"].item() == pytest.approx(reg / 3, rel=1e-5)
    # torchvision's per-image normalisation would give the mean of (image loss / image positives)
    per_image = ((pos0 + neg) / 1 + (pos_b0 + pos0 + neg) / 2) / 2
    assert abs(losses["classification"].item() - per_image) > 1e-3
    # unset box loss: torchvision's L1
    plain = _retina_head().compute_loss(*_retina_case())
    assert plain["bbox_regression"].item() == pytest.approx((0.05 + 0.2) / 3, rel=1e-5)


def test_retinanet_isr_p_and_carl_by_hand():
    head = _retina_head(
        box_loss=BoxLossConfig(type="smooth_l1", beta=0.11),
        isr_p=ISRPConfig(enabled=True),
        carl=CARLConfig(enabled=True),
    )
    losses = head.compute_loss(*_retina_case())
    pos0, _, pos_b0 = _retina_focal()
    # class 1: a0 alone (rank 0); class 2: b1 (IoU 1) rank 0, b0 (IoU 2/3) rank 1; M = 2
    raw = [1.0, 0.25, 1.0]  # a0, b0, b1 (batch order)
    losses_pos = [pos0, pos_b0, pos0]
    ratio = sum(losses_pos) / sum(w * loss for w, loss in zip(raw, losses_pos))
    d = head.pisa.record
    torch.testing.assert_close(d.isr_p_weights, torch.tensor([w * ratio for w in raw]))
    torch.testing.assert_close(d.ious, torch.tensor([1.0 * 9.5 / 10.5, 80 / 120, 1.0]))
    assert d.iou_hlr.tolist() == [0, 1, 0]
    # CARL (sigmoid scores): p = 0.5, 0.75, 0.5 -> v = 0.6, 0.8, 0.6 -> c = 3 v / 2.0
    c = [0.9, 1.2, 0.9]
    reg = [smooth_l1(0.05, 0.11), smooth_l1(0.2, 0.11), 0.0]
    assert losses["loss_carl"].item() == pytest.approx(sum(ci * r for ci, r in zip(c, reg)) / 3, rel=1e-5)
    torch.testing.assert_close(d.carl_weights, torch.tensor(c))


def test_retinanet_ranks_half_precision_deltas_in_float32():
    """Under autocast the deltas arrive in half precision; decoded in that dtype, boxes near
    1000 px round to 8 px steps and b0 (shifted 0.26 px) would tie b1 (IoU 1) and win the
    tie by order. Decoded in float32, b1 ranks first."""
    head = _retina_head(isr_p=ISRPConfig(enabled=True))
    targets, outputs, anchors, matched = _retina_case(torch.bfloat16, scale=1.0)
    box = torch.tensor([1024.0, 1024.0, 1152.0, 1152.0])
    anchors = [torch.stack([box, box + 200, box + 200]), torch.stack([box, box, box + 200])]
    targets = [{"boxes": box[None].clone(), "labels": t["labels"]} for t in targets]
    deltas = torch.zeros(2, 3, 4)
    deltas[1, 0, 0] = 0.002
    outputs["bbox_regression"] = deltas.to(torch.bfloat16).requires_grad_()
    head.compute_loss(targets, outputs, anchors, matched)
    d = head.pisa.record
    assert d.ious.dtype == torch.float32
    assert d.ious[1] < 1.0 and d.ious[2] == 1.0
    assert d.iou_hlr.tolist() == [0, 1, 0]


def test_mean_over_workers_without_process_group():
    assert mean_over_workers(0, torch.device("cpu")).item() == 1.0
    assert mean_over_workers(7, torch.device("cpu")).item() == 7.0


# ---------------------------------------------------------------- SSD


def test_ssd_isr_p_by_hand():
    """1 image, 10 anchors: p0 (shifted 0.5 px: IoU 95/105), p1 (shifted 2 px: IoU 80/120), both
    on one GT of class 1; 8 negatives of which hard mining keeps 3 per positive (6, all ln 4)."""
    head = PISASSDHead([8], [1], 4, ModelConfig(isr_p=ISRPConfig(enabled=True)))
    box = torch.tensor([0.0, 0.0, 10.0, 10.0])
    anchors = [torch.stack([box, box] + [box + 30 + 5 * i for i in range(8)])]
    targets = [{"boxes": box[None].clone(), "labels": torch.tensor([1])}]
    matched = [torch.tensor([0, 0] + [-1] * 8)]
    deltas = torch.zeros(1, 10, 4)
    deltas[0, 0, 0] = 0.5  # 0.5 * 10 / 10 px
    deltas[0, 1, 0] = 2.0
    logits = torch.zeros(1, 10, 4, requires_grad=True)
    outputs = {"cls_logits": logits, "bbox_regression": deltas.requires_grad_()}
    losses = head.compute_loss(targets, outputs, anchors, matched, BoxCoder((10.0, 10.0, 5.0, 5.0)), 3.0)
    # beta 1 smooth-L1 (torchvision's SSD, the reference's too), 2 positives
    assert losses["bbox_regression"].item() == pytest.approx((0.125 + 1.5) / 2, rel=1e-5)
    # equal CE (ln 4): raw weights 1, 0.25 rescaled by 2 / 1.25
    d = head.pisa.record
    torch.testing.assert_close(d.isr_p_weights, torch.tensor([1.6, 0.4]))
    torch.testing.assert_close(d.ious, torch.tensor([95 / 105, 80 / 120]))
    assert losses["classification"].item() == pytest.approx((1.6 + 0.4 + 6) * LN4 / 2, rel=1e-5)
    losses["classification"].backward()
    torch.testing.assert_close(logits.grad[0, 0], 1.6 * (torch.full((4,), 0.25) - torch.tensor([0.0, 1, 0, 0])) / 2)


# ---------------------------------------------------------------- one record for all


def test_every_detector_records_the_same_keys():
    keys = {"ious", "labels", "gt_inds", "cls_loss", "iou_hlr", "isr_p_weights", "carl_weights", "num_pos"}
    pisa = dict(isr_p=ISRPConfig(enabled=True), carl=CARLConfig(enabled=True))
    retina = _retina_head(**pisa)
    retina.compute_loss(*_retina_case())
    ssd = PISASSDHead([8], [1], 4, ModelConfig(**pisa))
    targets, outputs, anchors, matched = _retina_case()
    ssd.compute_loss(targets, outputs, anchors, matched, BoxCoder((10.0, 10.0, 5.0, 5.0)), 3.0)
    heads = _two_stage_heads(isr_p={"enabled": True}, carl={"enabled": True})
    samples, logits, deltas = _two_stage_case()
    heads.pisa_box_loss(logits, deltas, samples)
    for loss in (retina.pisa, ssd.pisa, heads.pisa):
        record = loss.record.as_dict()
        assert set(record) == keys
        assert all(not v.requires_grad for v in record.values())


def test_diagnostics_off_records_nothing():
    loss = PisaLoss(ISRPConfig(enabled=True), CARLConfig(enabled=True), diagnostics=False)
    head = _retina_head()
    head.pisa = loss
    head.compute_loss(*_retina_case())
    assert loss.record.as_dict() == {}
