"""PISA ops against straightforward loop implementations of the paper's algorithms."""

import math

import pytest
import torch
from torchvision.ops import box_iou

from pisa.core import pisa_math

# ---------------------------------------------------------------- loop references


def loop_iou_hlr(ious, labels, gt_inds):
    """Two-step ranking as the paper describes it, one class and one GT at a time."""
    ious = ious.clone().double()
    hlr = torch.zeros_like(labels)
    max_per_class = int(torch.bincount(labels).max())
    for cls in labels.unique().tolist():
        cls_idx = [i for i in range(len(labels)) if labels[i] == cls]
        key = {}
        for gt in {int(gt_inds[i]) for i in cls_idx}:
            members = sorted([i for i in cls_idx if gt_inds[i] == gt], key=lambda i: -ious[i])
            for rank, i in enumerate(members):
                key[i] = ious[i] + max_per_class - rank
        for pos, i in enumerate(sorted(cls_idx, key=lambda i: -key[i])):
            hlr[i] = pos
    return hlr


def loop_isr_p(ious, labels, gt_inds, cls_loss, k, bias, label_weights=None):
    n = len(ious)
    lw = torch.ones(n, dtype=torch.float64) if label_weights is None else label_weights.double()
    hlr = loop_iou_hlr(ious, labels, gt_inds)
    m = float(torch.bincount(labels).max())
    w = torch.tensor([lw[i] * (m - float(hlr[i])) / m for i in range(n)], dtype=torch.float64)
    w = (bias + (1 - bias) * w) ** k
    loss = cls_loss.double()
    if loss.dim() > 1:
        loss = loss.sum(1)
    return w * (lw * loss).sum() / (w * loss).sum()


def loop_nms_match(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    iou = box_iou(boxes, boxes)
    suppressed = set()
    groups = []
    for a, i in enumerate(order):
        if i in suppressed:
            continue
        group = [i]
        for j in order[a + 1 :]:
            if j not in suppressed and iou[i, j] > thr:
                suppressed.add(j)
                group.append(j)
        groups.append(group)
    return groups


def loop_score_hlr(boxes, scores, thr):
    n = len(scores)
    imp = [0.0] * n
    for group in loop_nms_match(boxes, scores, thr):
        for rank, i in enumerate(group):  # groups are in score order
            imp[i] = n - rank + float(scores[i])
    order = sorted(range(n), key=lambda i: -imp[i])
    hlr = torch.zeros(n, dtype=torch.long)
    for pos, i in enumerate(order):
        hlr[i] = pos
    return hlr


def random_positives(n, num_classes, num_gts, seed):
    g = torch.Generator().manual_seed(seed)
    gt_label = torch.randint(1, num_classes + 1, (num_gts,), generator=g)
    gt_inds = torch.randint(0, num_gts, (n,), generator=g)
    labels = gt_label[gt_inds]
    ious = torch.rand(n, generator=g) * 0.5 + 0.5  # continuous: no ties
    cls_loss = torch.rand(n, generator=g) * 2
    return ious, labels, gt_inds, cls_loss


def random_boxes(n, seed, size=200.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * 60 + 5
    return torch.cat([xy, xy + wh], 1), torch.rand(n, generator=g)


# ---------------------------------------------------------------- IoU-HLR / ISR-P


@pytest.mark.parametrize("seed,n,classes,gts", [(0, 50, 5, 12), (1, 200, 20, 60), (2, 7, 1, 3), (3, 30, 3, 30)])
def test_iou_hlr_matches_loop(seed, n, classes, gts):
    ious, labels, gt_inds, _ = random_positives(n, classes, gts, seed)
    assert torch.equal(pisa_math.iou_hlr(ious, labels, gt_inds), loop_iou_hlr(ious, labels, gt_inds))


def test_iou_hlr_small_case_by_hand():
    # GT 0: ious .9 .5 ; GT 1: ious .8 .7 ; same class.
    # IoU-LR: .9->0 .5->1 .8->0 .7->1 ; HLR order: (.9, .8, .7, .5)
    ious = torch.tensor([0.9, 0.5, 0.8, 0.7])
    labels = torch.tensor([1, 1, 1, 1])
    gt_inds = torch.tensor([0, 0, 1, 1])
    assert pisa_math.iou_hlr(ious, labels, gt_inds).tolist() == [0, 3, 1, 2]


@pytest.mark.parametrize("k,bias", [(2.0, 0.0), (1.0, 0.3), (0.5, 0.9)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_isr_p_matches_loop(k, bias, seed):
    ious, labels, gt_inds, cls_loss = random_positives(120, 8, 30, seed)
    lw = torch.rand(120, generator=torch.Generator().manual_seed(seed + 10)) + 0.5
    got = pisa_math.isr_p_weights(ious, labels, gt_inds, cls_loss, k=k, bias=bias, label_weights=lw)
    want = loop_isr_p(ious, labels, gt_inds, cls_loss, k, bias, lw)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # the positives' loss magnitude is unchanged
    assert float((got * cls_loss).sum()) == pytest.approx(float((lw * cls_loss).sum()), rel=1e-5)


def test_isr_p_multiclass_loss_is_summed():
    ious, labels, gt_inds, _ = random_positives(40, 4, 10, 5)
    loss2d = torch.rand(40, 5, generator=torch.Generator().manual_seed(3))
    got = pisa_math.isr_p_weights(ious, labels, gt_inds, loss2d)
    want = loop_isr_p(ious, labels, gt_inds, loss2d, 2.0, 0.0)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_isr_p_edge_cases():
    empty = torch.zeros(0)
    assert pisa_math.isr_p_weights(empty, empty.long(), empty.long(), empty).numel() == 0
    # one sample per GT, one class: IoU-HLR is the plain IoU order
    ious = torch.tensor([0.6, 0.9, 0.7])
    labels = torch.tensor([2, 2, 2])
    gts = torch.tensor([0, 1, 2])
    assert pisa_math.iou_hlr(ious, labels, gts).tolist() == [2, 0, 1]
    w = pisa_math.isr_p_weights(ious, labels, gts, torch.ones(3), k=1.0)
    # linear map (3 - hlr)/3 -> [1/3, 1, 2/3], rescaled to sum 3
    torch.testing.assert_close(w, torch.tensor([1 / 3, 1.0, 2 / 3]) * 1.5)
    # zero loss: weights stay finite
    assert torch.isfinite(pisa_math.isr_p_weights(ious, labels, gts, torch.zeros(3))).all()


def test_masked_isr_p_equals_isr_p_over_the_valid_slots_with_an_inf_in_a_padded_slot():
    """Fixed-size slots (the two-stage heads): the valid slots get the weights ISR-P gives the
    positives alone, the padded ones 1, and a padded slot's loss (inf here) changes nothing."""
    ious, labels, gt_inds, cls_loss = random_positives(60, 4, 12, 7)
    valid = torch.rand(60, generator=torch.Generator().manual_seed(1)) < 0.5
    valid[:2] = torch.tensor([True, False])
    padded_loss = cls_loss.clone()
    padded_loss[1] = float("inf")
    got = pisa_math.isr_p_weights(ious, labels, gt_inds, padded_loss, k=2.0, bias=0.1, valid=valid)
    alone = loop_isr_p(ious[valid], labels[valid], gt_inds[valid], cls_loss[valid], 2.0, 0.1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[valid].double(), alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[~valid], torch.ones(int((~valid).sum())))


def test_isr_p_prime_samples_get_more_weight():
    ious, labels, gt_inds, cls_loss = random_positives(100, 3, 20, 9)
    w = pisa_math.isr_p_weights(ious, labels, gt_inds, cls_loss)
    hlr = pisa_math.iou_hlr(ious, labels, gt_inds)
    for cls in labels.unique():
        m = labels == cls
        order = torch.argsort(hlr[m])
        assert torch.all(w[m][order][:-1] >= w[m][order][1:])


# ---------------------------------------------------------------- CARL


def test_carl_value_matches_formula():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(30, generator=g)
    reg = torch.rand(30, 4, generator=g)
    k, b = 1.5, 0.2
    v = (b + (1 - b) * p) ** k
    c = v / v.mean()
    want = (c[:, None] * reg).sum() / 30
    torch.testing.assert_close(pisa_math.carl_loss(p, reg, k=k, bias=b), want)
    torch.testing.assert_close(pisa_math.carl_loss(p, reg, k=k, bias=b, avg_factor=512), want * 30 / 512)


@pytest.mark.parametrize("k,bias", [(1.0, 0.2), (2.0, 0.0), (0.5, 0.5)])
def test_carl_gradient_matches_appendix_a(k, bias):
    g = torch.Generator().manual_seed(1)
    n = 64
    p = torch.rand(n, generator=g, dtype=torch.float64).requires_grad_()
    reg = torch.rand(n, generator=g, dtype=torch.float64) * 3
    loss = pisa_math.carl_loss(p, reg, k=k, bias=bias, avg_factor=1.0)
    (grad,) = torch.autograd.grad(loss, p)
    with torch.no_grad():
        v = (bias + (1 - bias) * p) ** k
        s = v.sum()
        c = n * v / s
        dv = (1 - bias) * k * (bias + (1 - bias) * p) ** (k - 1)
        exact = n / s * dv * (reg - (c * reg).sum() / n)
    torch.testing.assert_close(grad, exact, atol=1e-10, rtol=1e-8)


def test_carl_gradient_proportional_to_loss_for_k1_large_n():
    g = torch.Generator().manual_seed(2)
    n, b = 20000, 0.2
    p = torch.rand(n, generator=g, dtype=torch.float64).requires_grad_()
    reg = torch.rand(n, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(pisa_math.carl_loss(p, reg, k=1.0, bias=b, avg_factor=1.0), p)
    s = float((b + (1 - b) * p.detach()).sum())
    approx = n * (1 - b) / s * reg  # Appendix A, eq. (7)
    # the mean-loss term shifts every gradient by the same constant; the slope is exact
    slope = torch.linalg.lstsq(torch.stack([reg, torch.ones_like(reg)], 1), grad[:, None]).solution[0, 0]
    assert float(slope) == pytest.approx(n * (1 - b) / s, rel=1e-9)
    corr = torch.corrcoef(torch.stack([grad, approx]))[0, 1]
    assert float(corr) > 0.999999


def test_carl_empty_is_zero_with_grad():
    p = torch.zeros(0, requires_grad=True)
    out = pisa_math.carl_loss(p, torch.zeros(0, 4))
    assert float(out.detach()) == 0.0
    out.backward()


# ---------------------------------------------------------------- Score-HLR


@pytest.mark.parametrize("seed,n,thr", [(0, 60, 0.5), (1, 300, 0.5), (2, 150, 0.3), (3, 40, 0.7)])
def test_score_hlr_matches_loop(seed, n, thr):
    boxes, scores = random_boxes(n, seed)
    assert torch.equal(pisa_math.score_hlr(boxes, scores, thr), loop_score_hlr(boxes, scores, thr))


def test_nms_groups_match_greedy_nms():
    boxes, scores = random_boxes(200, 7)
    groups = pisa_math.nms_groups(boxes, scores, 0.5)
    ref = loop_nms_match(boxes, scores, 0.5)
    assert len(set(groups.tolist())) == len(ref)
    for members in ref:
        assert len({int(groups[i]) for i in members}) == 1


def test_score_hlr_edge_cases():
    assert pisa_math.score_hlr(torch.zeros(0, 4), torch.zeros(0)).numel() == 0
    one = pisa_math.score_hlr(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0.3]))
    assert one.tolist() == [0]
    # far-apart boxes: every box leads its own group -> plain score order
    boxes = torch.tensor([[0.0, 0, 10, 10], [100, 100, 110, 110], [200, 0, 210, 10]])
    assert pisa_math.score_hlr(boxes, torch.tensor([0.2, 0.9, 0.5])).tolist() == [2, 0, 1]
    # a cluster of three: the two suppressed boxes go after every leader
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.5, 0, 10.5, 10], [1, 0, 11, 10], [100, 100, 110, 110]])
    assert pisa_math.score_hlr(boxes, torch.tensor([0.9, 0.8, 0.7, 0.1])).tolist() == [0, 2, 3, 1]


def loop_score_hlr_weights(num_hlr_selected, loss, num_expected, num_valid, k, bias):
    up = max(num_expected, num_valid)
    w = [(up - r) / up for r in range(num_hlr_selected)]
    w += [min(w)] * (len(loss) - num_hlr_selected)
    w = torch.tensor([(bias + (1 - bias) * x) ** k for x in w], dtype=torch.float64)
    loss = loss.double()
    return w * loss.sum() / (w * loss).sum()


@pytest.mark.parametrize("num_valid,num_expected", [(300, 100), (40, 100), (100, 100)])
def test_score_hlr_weights_match_loop(num_valid, num_expected):
    num_hlr = min(num_valid, num_expected)
    loss = torch.rand(num_expected, generator=torch.Generator().manual_seed(0)) + 0.1
    got = pisa_math.score_hlr_weights(
        torch.arange(num_hlr), loss, num_expected, num_valid, k=0.5, bias=0.1, num_random=num_expected - num_hlr
    )
    want = loop_score_hlr_weights(num_hlr, loss, num_expected, num_valid, 0.5, 0.1)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert math.isclose(float((got * loss).sum()), float(loss.sum()), rel_tol=1e-5)


def test_compiled_torchvision_ops_run():
    from torchvision.ops import nms, roi_align

    boxes, scores = random_boxes(50, 0)
    keep = nms(boxes, scores, 0.5)
    assert 0 < keep.numel() <= 50 and float(scores[keep[0]]) == float(scores.max())
    feats = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    rois = torch.tensor([[0, 0.0, 0.0, 8.0, 8.0], [1, 4.0, 4.0, 12.0, 12.0]])
    out = roi_align(feats, rois, output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    assert out.shape == (2, 3, 2, 2)
    # an aligned RoI average of a linear ramp equals the ramp at the bin centre
    # (aligned: the first bin spans [-0.5, 3.5] in x and y, centre 1.5 -> 1.5 * 16 + 1.5)
    assert float(out[0, 0, 0, 0]) == pytest.approx(25.5, rel=1e-5)


@pytest.mark.parametrize("k,bias", [(1.0, 0.2), (2.0, 0.0), (0.5, 0.5)])
def test_masked_carl_gradient_matches_appendix_a_with_an_inf_in_a_padded_slot(k, bias):
    """Fixed-size slots (the two-stage heads): n and S run over the valid slots alone, a padded
    slot gets no gradient, and its loss, inf here, reaches neither the loss nor a gradient."""
    g = torch.Generator().manual_seed(4)
    slots = 48
    p = torch.rand(slots, generator=g, dtype=torch.float64).requires_grad_()
    reg = torch.rand(slots, 4, generator=g, dtype=torch.float64) * 3
    valid = torch.rand(slots, generator=g) < 0.6
    valid[:2] = torch.tensor([True, False])
    reg[1, 2] = float("inf")  # a padded slot's regression loss (a degenerate box's target)
    loss = pisa_math.carl_loss(p, reg, k=k, bias=bias, avg_factor=1.0, valid=valid)
    (grad,) = torch.autograd.grad(loss, p)
    with torch.no_grad():
        pv, lv = p[valid], reg[valid].sum(1)  # L(d_i, d^_i) of the valid slots
        n = int(valid.sum())
        v = (bias + (1 - bias) * pv) ** k
        s = v.sum()
        c = n * v / s
        dv = (1 - bias) * k * (bias + (1 - bias) * pv) ** (k - 1)  # eq. (6)
        # eq. (2)-(4) with every c_j's dependence on S: n/S * dv_i * (L_i - sum_j c_j L_j / n)
        exact = torch.zeros_like(p)
        exact[valid] = n / s * dv * (lv - (c * lv).sum() / n)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.detach(), (c * lv).sum())
    torch.testing.assert_close(grad, exact, atol=1e-10, rtol=1e-8)
