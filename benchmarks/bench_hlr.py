"""Time PISA's vectorized HLR ranking against per-class / per-GT / per-group loops.

The loop baselines use tensor ops inside Python loops, the way the ranking is
usually written (one class, then one ground truth, at a time). Prints the speedup
ratios measured in this run.

    python benchmarks/bench_hlr.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.ops import box_iou

from pisa.core import pisa_math


def loop_isr_p(ious, labels, gt_inds, cls_loss, k=2.0, bias=0.0):
    ious = ious.clone()
    weights = torch.ones_like(ious)
    max_l = labels.bincount().max()
    for cls in labels.unique():
        l_inds = (labels == cls).nonzero().view(-1)
        l_gts = gt_inds[l_inds]
        for gt in l_gts.unique():
            t_inds = l_inds[l_gts == gt]
            _, rank_idx = ious[t_inds].sort(descending=True)
            _, rank = rank_idx.sort()
            ious[t_inds] += max_l - rank.float()
        _, rank_idx = ious[l_inds].sort(descending=True)
        _, rank = rank_idx.sort()
        weights[l_inds] *= (max_l - rank.float()) / max_l
    weights = (bias + weights * (1 - bias)).pow(k)
    return weights * cls_loss.sum() / (weights * cls_loss).sum()


def loop_score_hlr(boxes, scores, iou_thr=0.5):
    order = scores.argsort(descending=True)
    iou = box_iou(boxes, boxes)
    suppressed = torch.zeros(len(scores), dtype=torch.bool)
    imp = torch.zeros_like(scores, dtype=torch.float64)
    n = len(scores)
    for i in order.tolist():
        if suppressed[i]:
            continue
        cand = order[~suppressed[order]]
        members = cand[(iou[i, cand] > iou_thr) | (cand == i)]
        suppressed[members] = True
        g = members[scores[members].argsort(descending=True)]
        imp[g] = n - torch.arange(len(g), dtype=torch.float64) + scores[g].double()
    _, idx = imp.sort(descending=True)
    _, rank = idx.sort()
    return rank


def timed(fn, repeat):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - start) / repeat, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)

    # ISR-P: 16 images x 128 positives, 80 classes, ~200 ground truths
    n, gts = 16 * 128, 200
    gt_label = torch.randint(0, 80, (gts,), generator=g)
    gt_inds = torch.randint(0, gts, (n,), generator=g)
    labels = gt_label[gt_inds]
    ious = torch.rand(n, generator=g) * 0.5 + 0.5
    cls_loss = torch.rand(n, generator=g)
    t_loop, w_loop = timed(lambda: loop_isr_p(ious, labels, gt_inds, cls_loss), args.repeat)
    t_vec, w_vec = timed(lambda: pisa_math.isr_p_weights(ious, labels, gt_inds, cls_loss), args.repeat)
    assert torch.allclose(w_loop, w_vec, atol=1e-5), "vectorized ISR-P differs from the loop"
    print(
        f"ISR-P     {n} positives, {labels.unique().numel()} classes, {gt_inds.unique().numel()} GTs: "
        f"loop {t_loop * 1e3:8.2f} ms  vectorized {t_vec * 1e3:7.2f} ms  speedup {t_loop / t_vec:6.1f}x"
    )

    # Score-HLR: 2000 negatives of one image
    m = 2000
    xy = torch.rand(m, 2, generator=g) * 800
    boxes = torch.cat([xy, xy + torch.rand(m, 2, generator=g) * 150 + 8], 1)
    scores = torch.rand(m, generator=g)
    t_loop, r_loop = timed(lambda: loop_score_hlr(boxes, scores), max(1, args.repeat // 4))
    t_vec, r_vec = timed(lambda: pisa_math.score_hlr(boxes, scores), args.repeat)
    assert torch.equal(r_loop, r_vec), "vectorized Score-HLR differs from the loop"
    groups = pisa_math.nms_groups(boxes, scores).unique().numel()
    print(
        f"Score-HLR {m} boxes, {groups} NMS groups: "
        f"loop {t_loop * 1e3:8.2f} ms  vectorized {t_vec * 1e3:7.2f} ms  speedup {t_loop / t_vec:6.1f}x"
    )


if __name__ == "__main__":
    main()
