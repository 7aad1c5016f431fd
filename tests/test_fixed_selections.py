"""Fixed-size selections (no host syncs) select what torchvision's and the old samplers did.

Deterministic selections are compared with independent references (torchvision's own
matcher, RPN filtering and losses; the old `nonzero`-based Score-HLR sampler kept here);
random ones by their counts and, over many draws, by a chi-square test of uniformity.
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats as scipy_stats
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.rpn import AnchorGenerator, RegionProposalNetwork, RPNHead
from torchvision.ops import box_iou

from pisa.core import pisa_math
from pisa.core.sampling import RandomSampler, RoIStats, ScoreHLRSampler, balanced_sample
from pisa.models.fixed_size import PisaMatcher, PisaRPN


def make_labels(num_pos, num_neg, num_ignored=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat(
        [
            torch.randint(1, 4, (num_pos,), generator=g),
            torch.zeros(num_neg, dtype=torch.long),
            torch.full((num_ignored,), -1, dtype=torch.long),
        ]
    )
    return labels[torch.randperm(labels.numel(), generator=g)]


def random_boxes(n, seed, size=100.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    return torch.cat([xy, xy + 2 + torch.rand(n, 2, generator=g) * size / 3], 1)


# ---------------------------------------------------------------- random sampling


@pytest.mark.parametrize("num_pos,num_neg,num_ignored", [(400, 1600, 50), (10, 1990, 0), (30, 40, 5), (0, 7, 3)])
def test_balanced_sample_counts_match_torchvision(num_pos, num_neg, num_ignored):
    labels = make_labels(num_pos, num_neg, num_ignored)
    theirs_pos, theirs_neg = det_utils.BalancedPositiveNegativeSampler(512, 0.25)([labels])
    torch.manual_seed(0)
    ours = balanced_sample(labels, 512, 0.25)
    assert ours.inds.numel() == min(512, labels.numel())  # fixed size, known on the host
    assert int(ours.is_pos.sum()) == int(theirs_pos[0].sum())
    assert int((ours.valid & ~ours.is_pos).sum()) == int(theirs_neg[0].sum())
    assert (labels[ours.pos_inds] >= 1).all() and (labels[ours.neg_inds] == 0).all()
    chosen = ours.inds[ours.valid]
    assert chosen.unique().numel() == chosen.numel()
    # the same seed draws the same sample
    torch.manual_seed(0)
    again = balanced_sample(labels, 512, 0.25)
    assert torch.equal(again.inds, ours.inds) and torch.equal(again.valid, ours.valid)


def test_balanced_sample_takes_everything_when_it_fits():
    labels = make_labels(20, 60, 30)
    torch.manual_seed(1)
    ours = balanced_sample(labels, 512, 0.5)
    assert set(ours.pos_inds.tolist()) == set(torch.where(labels >= 1)[0].tolist())
    assert set(ours.neg_inds.tolist()) == set(torch.where(labels == 0)[0].tolist())


def test_random_sampler_is_uniform_over_the_eligible():
    """Chi-square over 3000 draws: every eligible positive (negative) is drawn equally often."""
    labels = make_labels(12, 40, 8, seed=3)  # 4 of 12 positives, 12 of 40 negatives per draw
    sampler = RandomSampler(16, 0.25)
    pos_hits = torch.zeros(labels.numel())
    neg_hits = torch.zeros(labels.numel())
    torch.manual_seed(0)
    draws = 3000
    for _ in range(draws):
        res = sampler(labels)
        pos_hits[res.pos_inds] += 1
        neg_hits[res.neg_inds] += 1
    for hits, eligible, per_draw in ((pos_hits, labels >= 1, 4), (neg_hits, labels == 0, 12)):
        observed = hits[eligible]
        assert hits[~eligible].sum() == 0
        assert observed.sum() == draws * per_draw
        p = scipy_stats.chisquare(observed.numpy()).pvalue
        assert p > 1e-3, p


# ---------------------------------------------------------------- Score-HLR (ISR-N)


def old_score_hlr_sampler(labels, stats, num, pos_fraction, k, bias, thr, iou_thr, pos):
    """The nonzero-based ISR-N sampler this repository had, negatives only (positives given)."""
    neg = torch.nonzero(labels == 0).flatten()
    num_expected = min(neg.numel(), num - pos.numel())
    score = stats.fg_score[neg]
    valid = score > thr
    valid_inds = torch.nonzero(valid).flatten()
    num_valid = valid_inds.numel()
    num_hlr = min(num_valid, num_expected)
    hlr = pisa_math.score_hlr(stats.pred_boxes[neg[valid_inds]], score[valid_inds], iou_thr)
    order = torch.argsort(hlr)[:num_hlr]
    chosen = neg[valid_inds[order]]
    weights = pisa_math.score_hlr_weights(
        hlr[order], stats.bg_loss[chosen], num_expected=num_expected, num_valid=num_valid, k=k, bias=bias
    )
    return chosen, weights


@pytest.mark.parametrize("score_scale,seed", [(1.0, 0), (0.12, 1), (1.0, 2)])
def test_score_hlr_sampler_matches_the_old_one(score_scale, seed):
    labels = make_labels(60, 700, 20, seed=seed)
    n = labels.numel()
    g = torch.Generator().manual_seed(seed)
    stats = RoIStats(
        bg_loss=torch.rand(n, generator=g) + 0.05,
        fg_score=torch.rand(n, generator=g) * score_scale,
        pred_boxes=random_boxes(n, seed, 300.0),
    )
    sampler = ScoreHLRSampler(256, 0.25, k=0.5, bias=0.1, score_thr=0.05, iou_thr=0.5)
    res = sampler(labels, stats)
    expected, weights = old_score_hlr_sampler(labels, stats, 256, 0.25, 0.5, 0.1, 0.05, 0.5, res.pos_inds)
    num_hlr = expected.numel()
    neg = res.neg_inds
    assert neg.numel() == 256 - res.pos_inds.numel()
    assert torch.equal(neg[:num_hlr], expected)  # the Score-HLR picks, in HLR order
    if num_hlr == neg.numel():
        torch.testing.assert_close(res.neg_weights, weights)
    else:  # random low-score fill: the old weights' rule with the fill's losses appended
        low = stats.fg_score[neg[num_hlr:]] <= 0.05
        assert low.all()


def test_masked_score_hlr_equals_score_hlr_of_the_subset():
    boxes = random_boxes(300, 5, 200.0)
    scores = torch.rand(300, generator=torch.Generator().manual_seed(5))
    valid = torch.rand(300, generator=torch.Generator().manual_seed(6)) > 0.4
    full = pisa_math.score_hlr(boxes, scores, 0.5, valid=valid)
    alone = pisa_math.score_hlr(boxes[valid], scores[valid], 0.5)
    assert torch.equal(full[valid], alone)
    assert (full[~valid] >= int(valid.sum())).all()


# ---------------------------------------------------------------- torchvision parts


@pytest.mark.parametrize("low_quality", [True, False])
def test_matcher_equals_torchvision(low_quality):
    gt = random_boxes(6, 0)
    anchors = torch.cat([random_boxes(500, 1), gt[:2]])  # exact ties for two GTs
    iou = box_iou(gt, anchors)
    theirs = det_utils.Matcher(0.7, 0.3, low_quality)(iou)
    ours = PisaMatcher(0.7, 0.3, low_quality)(iou)
    assert torch.equal(ours, theirs)


def tiny_rpn(seed=0):
    torch.manual_seed(seed)
    anchors = AnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),) * 2)
    rpn = RegionProposalNetwork(
        anchors, RPNHead(8, 3), 0.7, 0.3, 4096, 0.5, dict(training=60, testing=60), dict(training=50, testing=50), 0.7
    )
    rpn.min_size = 2.0  # remove some (clipped) boxes, so the masking is exercised
    return rpn, PisaRPN.from_torchvision(rpn)


def rpn_inputs(seed=0):
    from torchvision.models.detection.image_list import ImageList

    g = torch.Generator().manual_seed(seed)
    images = ImageList(torch.rand(2, 3, 64, 64, generator=g), [(64, 64), (60, 50)])
    features = {"0": torch.randn(2, 8, 16, 16, generator=g), "1": torch.randn(2, 8, 8, 8, generator=g)}
    targets = [{"boxes": random_boxes(3, seed + 1, 40.0)}, {"boxes": random_boxes(2, seed + 2, 30.0)}]
    return images, features, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rpn_proposals_and_deterministic_losses_equal_torchvision(seed):
    """Proposals: the same boxes and scores. Losses: with every anchor sampled (4096 >= anchors)
    the sample is deterministic, so the loss values must be torchvision's."""
    theirs, ours = tiny_rpn(seed)
    theirs.train()
    ours.train()
    images, features, targets = rpn_inputs(seed)
    boxes_t, losses_t = theirs(images, features, targets)
    boxes_o, losses_o = ours(images, features, targets)
    for a, b in zip(boxes_o, boxes_t):
        assert a.shape == b.shape
        # the same set of boxes (rows sorted, as NMS may list score ties in another order)
        torch.testing.assert_close(torch.tensor(sorted(a.tolist())), torch.tensor(sorted(b.tolist())))
    for key in losses_t:
        torch.testing.assert_close(losses_o[key], losses_t[key])
