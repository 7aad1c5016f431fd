"""PISA maths as pure tensor functions: IoU-HLR, ISR-P, CARL, Score-HLR.

Everything here is vectorized: ranks "within a group" are computed with stable sorts
(a lexicographic sort built from successive stable sorts) and segment offsets, so
the cost does not grow with the number of classes, ground truths or NMS groups.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou, nms

__all__ = [
    "lexsort",
    "rank_within_groups",
    "iou_hlr",
    "isr_p_weights",
    "carl_weights",
    "carl_loss",
    "nms_groups",
    "score_hlr",
    "score_hlr_weights",
    "score_hlr_slot_weights",
    "compact_ids",
    "mask_groups",
]


def lexsort(*keys: Tensor) -> Tensor:
    """Indices that sort by keys[0], then keys[1], ... (all ascending, stable)."""
    order = torch.arange(keys[0].numel(), device=keys[0].device)
    for key in reversed(keys):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def rank_within_groups(groups: Tensor, *keys: Tensor) -> Tensor:
    """Position of each element inside its group when the group is sorted by `keys`.

    `groups` is any integer labelling; ties of all keys keep input order.
    """
    n = groups.numel()
    if n == 0:
        return groups.new_zeros(0, dtype=torch.long)
    return _rank_in_sorted(groups, lexsort(groups, *keys))


def _rank_in_sorted(groups: Tensor, order: Tensor) -> Tensor:
    """Rank of each element inside its group, given an `order` that sorts groups together."""
    n = order.numel()
    sorted_groups = groups[order]
    # start of each element's group in sorted order: running max of group-start positions
    position = torch.arange(n, device=order.device)
    is_start = torch.ones(n, dtype=torch.bool, device=order.device)
    is_start[1:] = sorted_groups[1:] != sorted_groups[:-1]
    starts = torch.cummax(torch.where(is_start, position, torch.zeros_like(position)), 0).values
    rank = torch.empty_like(order)
    rank[order] = position - starts
    return rank


def iou_hlr(ious: Tensor, labels: Tensor, gt_inds: Tensor) -> Tensor:
    """IoU hierarchical local rank of positives (0 = most important).

    Step 1 (IoU-LR): rank the samples of each ground truth by IoU, descending.
    Step 2: inside each class, order by IoU-LR, then by IoU descending.
    `gt_inds` must identify ground truths uniquely across the batch.
    """
    ious = ious.detach().float()
    n = ious.numel()
    if n == 0:
        return labels.new_zeros(0, dtype=torch.long)
    # One integer sort key per step (exact, no float ties): group * n^2 + ... + IoU order.
    # Compact group ids are < n, so the bound is known on the host (no `int(t.max())`).
    iou_order = _dense_rank(-ious)
    if n**3 >= 2**62:
        local_rank = rank_within_groups(gt_inds, -ious)
        return rank_within_groups(labels, local_rank, -ious)
    gt, cls = compact_ids(gt_inds), compact_ids(labels)
    local_rank = _rank_by_key(gt, gt * n + iou_order)
    return _rank_by_key(cls, (cls * n + local_rank) * n + iou_order)


def compact_ids(groups: Tensor) -> Tensor:
    """Group labels renumbered 0, 1, ... in sorted order: same partition, values below n.

    Keeps integer sort keys in range with a bound known on the host, where the raw labels
    would need `max()` read back from the device."""
    n = groups.numel()
    if n == 0:
        return groups.new_zeros(0, dtype=torch.long)
    sorted_groups, order = torch.sort(groups.long())
    is_start = torch.ones(n, dtype=torch.long, device=groups.device)
    is_start[1:] = (sorted_groups[1:] != sorted_groups[:-1]).long()
    ids = torch.empty_like(order)
    ids[order] = torch.cumsum(is_start, 0) - 1
    return ids


def _dense_rank(values: Tensor) -> Tensor:
    """Position of each element in the stable ascending sort of `values`."""
    order = torch.sort(values, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank


def _rank_by_key(groups: Tensor, key: Tensor) -> Tensor:
    """Rank inside each group by a unique integer `key` that sorts groups first."""
    return _rank_in_sorted(groups, torch.sort(key).indices)


@torch.no_grad()
def isr_p_weights(
    ious: Tensor,
    labels: Tensor,
    gt_inds: Tensor,
    cls_loss: Tensor,
    k: float = 2.0,
    bias: float = 0.0,
    label_weights: Tensor | None = None,
    hlr: Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """ISR-P: importance weights of the positives from their IoU-HLR.

    `w = lw * (M - hlr) / M` (M: most positives of one class), then
    `(bias + (1 - bias) w) ** k`, then rescaled so the positives' weighted
    classification loss equals the original one (ISR-P moves attention, not magnitude).
    `hlr` passes an IoU-HLR already computed from the same inputs. `valid` marks the
    positives among fixed-size slots (the others get weight 1 and change nothing): the
    same weights as over the selected positives alone, without selecting them.
    """
    n = ious.numel()
    ious = ious.detach().float()
    if label_weights is None:
        label_weights = ious.new_ones(n)
    label_weights = label_weights.detach().float()
    if n == 0:
        return label_weights.clone()
    if valid is not None:
        labels, gt_inds = mask_groups(labels, valid), mask_groups(gt_inds, valid)
    if hlr is None:
        hlr = iou_hlr(ious, labels, gt_inds)
    mask = ious.new_ones(n) if valid is None else valid.to(ious.dtype)
    # M = the largest class: its last rank + 1 (bincount would read its size back on a GPU)
    max_per_class = (hlr.to(ious.dtype) * mask).max() + 1.0
    weights = label_weights * (max_per_class - hlr.to(ious.dtype)) / max_per_class
    weights = (bias + (1.0 - bias) * weights).pow(k)
    loss = cls_loss.detach().float()
    if loss.dim() > 1:
        loss = loss.sum(dim=tuple(range(1, loss.dim())))
    if valid is not None:  # a padded slot's loss may be inf: zeroed, since 0 * inf is NaN
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    original = (label_weights * loss).sum()
    reweighted = (weights * loss).sum()
    ratio = torch.where(reweighted > 0, original / reweighted.clamp_min(1e-12), torch.ones_like(original))
    weights = weights * ratio
    return weights if valid is None else torch.where(valid, weights, torch.ones_like(weights))


def mask_groups(groups: Tensor, valid: Tensor) -> Tensor:
    """Group labels with every invalid slot in one extra group below all valid ones, so
    that ranks inside the valid groups are those of the valid elements alone."""
    groups = groups.long()
    return torch.where(valid, groups, groups.min() - 1)


def carl_weights(cls_prob: Tensor, k: float = 1.0, bias: float = 0.2, valid: Tensor | None = None) -> Tensor:
    """CARL's per-positive factors `c = n v / sum(v)` with `v = (bias + (1 - bias) p) ** k` (mean 1).

    With `valid` (fixed-size slots) n and the sum run over the valid slots; the others get 0."""
    v = (bias + (1.0 - bias) * cls_prob).pow(k)
    if valid is None:
        return v * (cls_prob.numel() / v.sum())
    mask = valid.to(v.dtype)
    v = v * mask
    return v * (mask.sum() / v.sum().clamp_min(1e-12))


def carl_loss(
    cls_prob: Tensor,
    reg_loss: Tensor,
    k: float = 1.0,
    bias: float = 0.2,
    avg_factor: float | Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """CARL: regression loss of positives weighted by their classification score.

    `v = (bias + (1 - bias) p) ** k`, `c = n v / sum(v)`, loss = `sum(c * reg) / avg_factor`.
    Gradients flow into `cls_prob`: a positive with a large regression loss is pushed
    to a higher score (Appendix A: dL/dp_i is proportional to L_i for k = 1). `valid` marks
    the positives among fixed-size slots (the same loss as over those alone).
    """
    n = cls_prob.numel()
    if n == 0:
        return reg_loss.sum() * 0.0 + cls_prob.sum() * 0.0
    c = carl_weights(cls_prob, k, bias, valid)
    if reg_loss.dim() > 1:
        c = c.reshape(-1, *([1] * (reg_loss.dim() - 1)))
    if avg_factor is None:
        avg_factor = n if valid is None else valid.sum().clamp_min(1)
    if valid is not None:  # an unused slot's loss may be inf: zeroed first, since 0 * inf is NaN (in the backward too)
        keep = valid.reshape(-1, *([1] * (reg_loss.dim() - 1)))
        return (c * torch.where(keep, reg_loss, torch.zeros_like(reg_loss))).sum() / avg_factor
    return (c * reg_loss).sum() / avg_factor


def nms_groups(boxes: Tensor, scores: Tensor, iou_thr: float = 0.5) -> Tensor:
    """Group id of each box under greedy NMS: a kept box and the boxes it suppresses.

    A suppressed box belongs to the highest-scoring kept box overlapping it above
    `iou_thr` (exactly the one that suppresses it in greedy NMS). Group ids are the
    positions of the leaders in score order.
    """
    n = boxes.shape[0]
    if n == 0:
        return boxes.new_zeros(0, dtype=torch.long)
    boxes = boxes.detach().float()
    scores = scores.detach().float()
    keep = nms(boxes, scores, iou_thr)  # leaders, in descending score order
    num_keep = keep.numel()  # known on the host once NMS has run: no further wait
    # every box against the leaders (not only the suppressed ones: no variable-size selection)
    overlaps = box_iou(boxes[keep], boxes) > iou_thr  # (K, N)
    # the first (best-scoring) kept box overlapping a follower is its suppressor
    first = overlaps.to(torch.uint8).argmax(dim=0)
    # degenerate boxes (NaN IoU) match nothing: each becomes its own group
    own = num_keep + torch.arange(n, device=boxes.device)
    leader = torch.where(overlaps.any(dim=0), first, own)
    leader[keep] = torch.arange(num_keep, device=boxes.device)
    return leader


def score_hlr(boxes: Tensor, scores: Tensor, iou_thr: float = 0.5, valid: Tensor | None = None) -> Tensor:
    """Score hierarchical local rank of negatives (0 = most important).

    Boxes are grouped by NMS matching; a box's local rank is its score rank inside
    its group; the HLR orders all boxes by (local rank, score descending). With `valid`,
    the valid boxes get the HLR they would get alone (0 .. V-1) and the others rank after
    them: invalid boxes score -inf, so NMS meets them last and they never lead a valid
    box, and they sort behind every valid box inside a group.
    """
    n = boxes.shape[0]
    if n == 0:
        return boxes.new_zeros(0, dtype=torch.long)
    scores = scores.detach().float()
    if valid is not None:
        scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    groups = nms_groups(boxes, scores, iou_thr)
    score_order = _dense_rank(-scores)
    local_rank = _rank_by_key(groups, groups * n + score_order)
    key = local_rank * n + score_order
    if valid is not None:
        key = torch.where(valid, key, n * n + score_order)
    return _dense_rank(key)


@torch.no_grad()
def score_hlr_weights(
    hlr: Tensor,
    loss: Tensor,
    num_expected: int,
    num_valid: int,
    k: float = 0.5,
    bias: float = 0.0,
    num_random: int = 0,
) -> Tensor:
    """ISR-N weights of the selected negatives.

    `hlr`/`loss` cover the selected negatives ranked by Score-HLR (first `len(hlr)`)
    followed by `num_random` randomly drawn low-score ones whose losses are appended
    to `loss`. `w = (up - hlr) / up` with `up = max(num_expected, num_valid)`; random
    picks get the smallest HLR weight; then `(bias + (1 - bias) w) ** k`, rescaled to
    keep the selected negatives' loss sum.
    """
    up = float(max(num_expected, num_valid))
    w_hlr = (up - hlr.float()) / up
    if num_random > 0:
        fill = w_hlr.min() if w_hlr.numel() > 0 else w_hlr.new_tensor(1.0)
        weights = torch.cat([w_hlr, fill.expand(num_random)])
    else:
        weights = w_hlr
    weights = (bias + (1.0 - bias) * weights).pow(k)
    loss = loss.detach().float()
    original = loss.sum()
    reweighted = (weights * loss).sum()
    ratio = torch.where(reweighted > 0, original / reweighted.clamp_min(1e-12), torch.ones_like(original))
    return weights * ratio


@torch.no_grad()
def score_hlr_slot_weights(
    hlr: Tensor,
    loss: Tensor,
    is_hlr: Tensor,
    is_random: Tensor,
    num_valid: Tensor,
    k: float = 0.5,
    bias: float = 0.0,
) -> Tensor:
    """`score_hlr_weights` over fixed-size slots, with the counts left on the device.

    Slots `is_hlr` hold the negatives picked by Score-HLR (`hlr` their rank among the
    `num_valid` high-score negatives, the picks being ranks 0 .. h-1), `is_random` the random
    low-score ones; other slots get weight 1. Same weights as `score_hlr_weights` on the picks.
    """
    is_hlr = is_hlr.bool()
    is_random = is_random.bool()
    num_hlr = is_hlr.sum()
    num_expected = num_hlr + is_random.sum()
    up = torch.maximum(num_expected, num_valid).float().clamp_min(1.0)
    w_hlr = (up - hlr.float()) / up
    # random picks share the smallest weight of the picks: the last pick has rank h - 1
    fill = torch.where(num_hlr > 0, (up - (num_hlr - 1).float()) / up, torch.ones_like(up))
    weights = torch.where(is_hlr, w_hlr, fill)
    weights = (bias + (1.0 - bias) * weights).pow(k)
    picked = is_hlr | is_random
    loss = torch.where(picked, loss.detach().float(), torch.zeros_like(weights))
    original = loss.sum()
    reweighted = (weights * loss).sum()
    ratio = torch.where(reweighted > 0, original / reweighted.clamp_min(1e-12), torch.ones_like(original))
    return torch.where(picked, weights * ratio, torch.ones_like(weights))
