"""RoI samplers for two-stage heads: random, OHEM, OHEM 1:3 and Score-HLR (ISR-N).

All samplers share one call: `sampler(labels, stats)` where `labels` holds, per
proposal of one image, the matched class (>= 1), 0 for background and -1 for ignored.
Samplers that rank by the head's own predictions (`needs_stats = True`) get a
`RoIStats` computed by the head in a no-grad forward over all proposals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .pisa_math import score_hlr, score_hlr_weights

if TYPE_CHECKING:
    from .config import ModelConfig

__all__ = [
    "RoIStats",
    "SampleResult",
    "RandomSampler",
    "OHEMSampler",
    "ScoreHLRSampler",
    "build_sampler",
]


@dataclass
class RoIStats:
    """No-grad predictions of the box head over all proposals of one image."""

    loss: Tensor | None = None  # (N,) cls + reg loss against each RoI's own target (OHEM)
    bg_loss: Tensor | None = None  # (N,) classification loss against background (ISR-N)
    fg_score: Tensor | None = None  # (N,) highest foreground probability (ISR-N)
    pred_boxes: Tensor | None = None  # (N, 4) decoded box of the argmax foreground class (ISR-N)


@dataclass
class SampleResult:
    pos_inds: Tensor  # (P,) indices into the proposals
    neg_inds: Tensor  # (Q,)
    neg_weights: Tensor | None = None  # (Q,) ISR-N label weights, aligned with neg_inds


def _random_subset(inds: Tensor, num: int) -> Tensor:
    if inds.numel() <= num:
        return inds
    return inds[torch.randperm(inds.numel(), device=inds.device)[:num]]


def _split(labels: Tensor) -> tuple[Tensor, Tensor]:
    pos = torch.nonzero(labels >= 1).flatten()
    neg = torch.nonzero(labels == 0).flatten()
    return pos, neg


class RandomSampler:
    """The paper's baseline: `num` RoIs per image, at most `pos_fraction` positives."""

    needs_stats = False

    def __init__(self, num: int = 512, pos_fraction: float = 0.25):
        self.num = num
        self.pos_fraction = pos_fraction

    def __call__(self, labels: Tensor, stats: RoIStats | None = None) -> SampleResult:
        pos, neg = _split(labels)
        pos = _random_subset(pos, int(self.num * self.pos_fraction))
        neg = _random_subset(neg, self.num - pos.numel())
        return SampleResult(pos, neg)

    def __repr__(self) -> str:
        return f"RandomSampler(num={self.num}, pos_fraction={self.pos_fraction})"


class OHEMSampler:
    """Online hard example mining: keep the `num` RoIs of highest loss.

    With `pos_fraction=None` positives and negatives compete for the same `num`
    places (OHEM); with `pos_fraction=0.25` they are mined apart (OHEM 1:3).
    """

    needs_stats = True

    def __init__(self, num: int = 512, pos_fraction: float | None = None):
        self.num = num
        self.pos_fraction = pos_fraction

    @staticmethod
    def _hardest(inds: Tensor, loss: Tensor, num: int) -> Tensor:
        if inds.numel() <= num:
            return inds
        return inds[torch.topk(loss[inds], num, sorted=False).indices]

    def __call__(self, labels: Tensor, stats: RoIStats | None = None) -> SampleResult:
        if stats is None or stats.loss is None:
            raise ValueError("OHEMSampler needs RoIStats.loss")
        loss = stats.loss
        if self.pos_fraction is None:
            chosen = self._hardest(torch.nonzero(labels >= 0).flatten(), loss, self.num)
            chosen_labels = labels[chosen]
            return SampleResult(chosen[chosen_labels >= 1], chosen[chosen_labels == 0])
        pos, neg = _split(labels)
        pos = self._hardest(pos, loss, int(self.num * self.pos_fraction))
        neg = self._hardest(neg, loss, self.num - pos.numel())
        return SampleResult(pos, neg)

    def __repr__(self) -> str:
        return f"OHEMSampler(num={self.num}, pos_fraction={self.pos_fraction})"


class ScoreHLRSampler:
    """ISR-N: negatives with a foreground score above `score_thr` are picked by
    Score-HLR and reweighted; the remaining places go to random low-score negatives.
    Positives are sampled at random as in the baseline.
    """

    needs_stats = True

    def __init__(
        self,
        num: int = 512,
        pos_fraction: float = 0.25,
        k: float = 0.5,
        bias: float = 0.0,
        score_thr: float = 0.05,
        iou_thr: float = 0.5,
    ):
        self.num = num
        self.pos_fraction = pos_fraction
        self.k = k
        self.bias = bias
        self.score_thr = score_thr
        self.iou_thr = iou_thr

    def __call__(self, labels: Tensor, stats: RoIStats | None = None) -> SampleResult:
        if stats is None or stats.fg_score is None or stats.pred_boxes is None or stats.bg_loss is None:
            raise ValueError("ScoreHLRSampler needs RoIStats.fg_score, pred_boxes and bg_loss")
        pos, neg = _split(labels)
        pos = _random_subset(pos, int(self.num * self.pos_fraction))
        num_expected = min(neg.numel(), self.num - pos.numel())
        if num_expected == 0:
            return SampleResult(pos, neg[:0], stats.bg_loss.new_ones(0))

        score = stats.fg_score[neg]
        valid = score > self.score_thr
        valid_inds = torch.nonzero(valid).flatten()
        invalid_inds = torch.nonzero(~valid).flatten()
        num_valid = valid_inds.numel()
        if num_valid == 0:
            chosen = _random_subset(neg, num_expected)
            return SampleResult(pos, chosen, stats.bg_loss.new_ones(chosen.numel()))

        num_hlr = min(num_valid, num_expected)
        num_rand = num_expected - num_hlr
        hlr = score_hlr(stats.pred_boxes[neg[valid_inds]], score[valid_inds], self.iou_thr)
        hlr_order = torch.argsort(hlr)[:num_hlr]
        picked = [valid_inds[hlr_order]]
        if num_rand > 0:
            picked.append(_random_subset(invalid_inds, num_rand))
        chosen = neg[torch.cat(picked)]
        weights = score_hlr_weights(
            hlr[hlr_order],
            stats.bg_loss[chosen],
            num_expected=num_expected,
            num_valid=num_valid,
            k=self.k,
            bias=self.bias,
            num_random=chosen.numel() - num_hlr,
        )
        return SampleResult(pos, chosen, weights)

    def __repr__(self) -> str:
        return (
            f"ScoreHLRSampler(num={self.num}, pos_fraction={self.pos_fraction}, k={self.k}, "
            f"bias={self.bias}, score_thr={self.score_thr}, iou_thr={self.iou_thr})"
        )


def build_sampler(cfg: ModelConfig):
    """The sampler named by `cfg.sampler`, sized by `rois_per_image` and `pos_fraction`."""
    match cfg.sampler:
        case "random":
            return RandomSampler(cfg.rois_per_image, cfg.pos_fraction)
        case "ohem":
            return OHEMSampler(cfg.rois_per_image, None)
        case "ohem_1to3":
            return OHEMSampler(cfg.rois_per_image, cfg.pos_fraction)
        case "score_hlr":
            n = cfg.isr_n
            return ScoreHLRSampler(cfg.rois_per_image, cfg.pos_fraction, n.k, n.bias, n.score_thr, n.iou_thr)
        case other:
            raise ValueError(f"unknown sampler {other!r}")
