"""RoI samplers: sizes, ratios, hardness and ISR-N weights."""

import pytest
import torch

from pisa.core import pisa_math
from pisa.core.config import ModelConfig
from pisa.core.sampling import OHEMSampler, RandomSampler, RoIStats, ScoreHLRSampler, build_sampler


def make_labels(num_pos, num_neg, num_ignored=0, seed=0):
    labels = torch.cat(
        [
            torch.randint(1, 4, (num_pos,)),
            torch.zeros(num_neg, dtype=torch.long),
            torch.full((num_ignored,), -1, dtype=torch.long),
        ]
    )
    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))
    return labels[perm]


def random_stats(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 80 + 4], 1)
    return RoIStats(
        loss=torch.rand(n, generator=g) * 3,
        bg_loss=torch.rand(n, generator=g) + 0.05,
        fg_score=torch.rand(n, generator=g),
        pred_boxes=boxes,
    )


def test_random_sampler_ratio_and_size():
    torch.manual_seed(0)
    labels = make_labels(400, 1600, 50)
    res = RandomSampler(512, 0.25)(labels)
    assert res.pos_inds.numel() == 128 and res.neg_inds.numel() == 384
    assert (labels[res.pos_inds] >= 1).all() and (labels[res.neg_inds] == 0).all()
    assert res.pos_inds.unique().numel() == 128 and res.neg_inds.unique().numel() == 384
    # few positives: negatives fill up the 512
    res = RandomSampler(512, 0.25)(make_labels(10, 1990))
    assert res.pos_inds.numel() == 10 and res.neg_inds.numel() == 502


def test_ohem_keeps_highest_loss():
    labels = make_labels(300, 1700, 30)
    stats = random_stats(2030)
    res = OHEMSampler(512)(labels, stats)
    chosen = torch.cat([res.pos_inds, res.neg_inds])
    assert chosen.numel() == 512
    valid = torch.nonzero(labels >= 0).flatten()
    threshold = stats.loss[valid].topk(512).values.min()
    assert float(stats.loss[chosen].min()) >= float(threshold)
    assert (labels[chosen] >= 0).all()


def test_ohem_1to3_mines_apart():
    labels = make_labels(300, 1700)
    stats = random_stats(2000, 1)
    res = OHEMSampler(512, 0.25)(labels, stats)
    assert res.pos_inds.numel() == 128 and res.neg_inds.numel() == 384
    pos_all = torch.nonzero(labels >= 1).flatten()
    neg_all = torch.nonzero(labels == 0).flatten()
    assert float(stats.loss[res.pos_inds].min()) >= float(stats.loss[pos_all].topk(128).values.min())
    assert float(stats.loss[res.neg_inds].min()) >= float(stats.loss[neg_all].topk(384).values.min())


def test_score_hlr_sampler_picks_by_hlr_and_weights():
    torch.manual_seed(0)
    labels = make_labels(100, 1900)
    stats = random_stats(2000, 2)
    sampler = ScoreHLRSampler(512, 0.25, k=0.5, bias=0.0, score_thr=0.05, iou_thr=0.5)
    res = sampler(labels, stats)
    assert res.pos_inds.numel() == 100 and res.neg_inds.numel() == 412
    neg = torch.nonzero(labels == 0).flatten()
    valid = neg[stats.fg_score[neg] > 0.05]
    hlr = pisa_math.score_hlr(stats.pred_boxes[valid], stats.fg_score[valid], 0.5)
    expected = valid[torch.argsort(hlr)[:412]]
    assert torch.equal(res.neg_inds, expected)
    up = max(412, valid.numel())
    w = ((up - torch.arange(412).float()) / up) ** 0.5
    w = w * stats.bg_loss[expected].sum() / (w * stats.bg_loss[expected]).sum()
    torch.testing.assert_close(res.neg_weights, w)


def test_score_hlr_sampler_all_below_threshold_is_random_with_unit_weights():
    labels = make_labels(20, 500)
    stats = random_stats(520, 3)
    stats.fg_score = stats.fg_score * 0.01  # every negative below score_thr
    res = ScoreHLRSampler(128, 0.25)(labels, stats)
    assert res.neg_inds.numel() == 108
    assert torch.equal(res.neg_weights, torch.ones(108))


def test_score_hlr_sampler_fills_with_random_low_score_negatives():
    labels = make_labels(10, 400)
    stats = random_stats(410, 4)
    neg = torch.nonzero(labels == 0).flatten()
    stats.fg_score[neg] = 0.01
    stats.fg_score[neg[:20]] = 0.5 + torch.rand(20) * 0.4  # 20 valid negatives
    res = ScoreHLRSampler(128, 0.25)(labels, stats)
    assert res.neg_inds.numel() == 118
    assert set(res.neg_inds[:20].tolist()) == set(neg[:20].tolist())
    # random picks share the smallest HLR weight
    assert torch.allclose(res.neg_weights[20:], res.neg_weights[20:].min().expand(98))
    assert float((res.neg_weights * stats.bg_loss[res.neg_inds]).sum()) == pytest.approx(
        float(stats.bg_loss[res.neg_inds].sum()), rel=1e-5
    )


def test_no_negatives_no_positives():
    assert ScoreHLRSampler(64)(torch.ones(5, dtype=torch.long), random_stats(5)).neg_inds.numel() == 0
    res = RandomSampler(64)(torch.zeros(10, dtype=torch.long))
    assert res.pos_inds.numel() == 0 and res.neg_inds.numel() == 10


@pytest.mark.parametrize(
    "name,cls",
    [("random", RandomSampler), ("ohem", OHEMSampler), ("ohem_1to3", OHEMSampler), ("score_hlr", ScoreHLRSampler)],
)
def test_build_sampler(name, cls):
    s = build_sampler(ModelConfig(sampler=name, rois_per_image=256))
    assert isinstance(s, cls) and s.num == 256
    if name == "ohem":
        assert s.pos_fraction is None
