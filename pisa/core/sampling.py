"""RoI samplers for two-stage heads: random, OHEM, OHEM 1:3 and Score-HLR (ISR-N).

All samplers share one call: `sampler(labels, stats)` where `labels` holds, per
proposal of one image, the matched class (>= 1), 0 for background and -1 for ignored.
Samplers that rank by the head's own predictions (`needs_stats = True`) get a
`RoIStats` computed by the head in a no-grad forward over all proposals.

Every sampler returns fixed-size slots (`SampleResult`): a top-k over keys (random keys,
losses or Score-HLR ranks) with ineligible proposals at -inf, and a validity mask for the
count actually eligible. Nothing is selected by `nonzero` or drawn by a `randperm` sized by a
device count, so sampling never makes the host wait for a GPU.

Random keys come from a generator per image when the image's target carries a `draw_seed`
(`pisa.data.draws`: training data does), so an image's sample does not depend on which
worker trains it or beside which other images; without one, from the process's RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .pisa_math import score_hlr, score_hlr_slot_weights

if TYPE_CHECKING:
    from .config import ModelConfig

__all__ = [
    "DRAW_SEED",
    "DrawStream",
    "RoIStats",
    "SampleResult",
    "balanced_sample",
    "fill_slots",
    "image_generator",
    "random_keys",
    "top_positives",
    "RandomSampler",
    "OHEMSampler",
    "ScoreHLRSampler",
    "build_sampler",
]


DRAW_SEED = "draw_seed"  # the target field with an image's seed for its draws


class DrawStream(IntEnum):
    """The independent draws a detector makes per image, each from its own generator."""

    ANCHORS = 1  # the RPN's anchor sample
    ROIS = 2  # the RoI head's proposal sample


def image_generator(target: dict[str, Any], device: torch.device, stream: DrawStream) -> torch.Generator | None:
    """A generator on `device` for one image's `stream` of draws, seeded from its target's
    `draw_seed` (None without one: the process's RNG draws). Seeding is host-side: no sync."""
    seed = target.get(DRAW_SEED)
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) * 4 + int(stream))
    return generator


@dataclass
class RoIStats:
    """No-grad predictions of the box head over all proposals of one image."""

    loss: Tensor | None = None  # (N,) cls + reg loss against each RoI's own target (OHEM)
    bg_loss: Tensor | None = None  # (N,) classification loss against background (ISR-N)
    fg_score: Tensor | None = None  # (N,) highest foreground probability (ISR-N)
    pred_boxes: Tensor | None = None  # (N, 4) decoded box of the argmax foreground class (ISR-N)


@dataclass
class SampleResult:
    """A fixed-size sample of one image's proposals (no variable-size selection, no host sync).

    `inds` has `min(num, N)` slots, a size known on the host: the sampled positives first,
    then the sampled negatives, then unused slots (`valid` False) when fewer were eligible.
    """

    inds: Tensor  # (S,) indices into the proposals
    valid: Tensor  # (S,) bool, the slots actually sampled
    is_pos: Tensor  # (S,) bool, valid positive slots
    weights: Tensor | None = None  # (S,) ISR-N label weights on negative slots, 1 elsewhere

    @property
    def pos_inds(self) -> Tensor:
        """The sampled positives as an index list (a host sync: for tests and inspection)."""
        return self.inds[self.is_pos]

    @property
    def neg_inds(self) -> Tensor:
        """The sampled negatives as an index list (a host sync)."""
        return self.inds[self.valid & ~self.is_pos]

    @property
    def neg_weights(self) -> Tensor | None:
        """ISR-N weights aligned with `neg_inds` (a host sync)."""
        return None if self.weights is None else self.weights[self.valid & ~self.is_pos]


def random_keys(n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """Uniform keys: the top-k of iid keys over a set is a uniform random subset of it."""
    return torch.rand(n, device=device, generator=generator).double()


def top_positives(labels: Tensor, key: Tensor, num: int) -> Tensor:
    """Mask of the (up to) `num` positives of largest `key`: a fixed-size top-k, not nonzero + randperm."""
    chosen = torch.zeros_like(labels, dtype=torch.bool)
    k = min(num, labels.numel())
    if k == 0:
        return chosen
    eligible = labels >= 1
    top = torch.topk(torch.where(eligible, key, torch.full_like(key, float("-inf"))), k)
    return chosen.scatter(0, top.indices, eligible[top.indices])


def fill_slots(labels: Tensor, chosen_pos: Tensor, neg_key: Tensor, num: int) -> SampleResult:
    """The chosen positives, then up to `num - #positives` eligible negatives (labels 0) of
    largest `neg_key`, in `min(num, N)` slots: counts stay on the device."""
    n = labels.numel()
    negative = labels == 0
    inf = torch.full_like(neg_key, float("inf"))
    key = torch.where(chosen_pos, inf, torch.where(negative, neg_key, -inf))
    slots = min(num, n)
    inds = torch.topk(key, slots).indices
    num_pos = chosen_pos.sum()
    num_neg = torch.minimum(negative.sum(), num - num_pos)
    position = torch.arange(slots, device=labels.device)
    return SampleResult(inds, position < num_pos + num_neg, position < num_pos)


def balanced_sample(
    labels: Tensor, num: int, pos_fraction: float, generator: torch.Generator | None = None
) -> SampleResult:
    """torchvision's `BalancedPositiveNegativeSampler` without host syncs: up to
    `int(num * pos_fraction)` random positives, random negatives for the rest (as many as there are)."""
    keys = random_keys(labels.numel(), labels.device, generator)
    chosen = top_positives(labels, keys, int(num * pos_fraction))
    return fill_slots(labels, chosen, keys, num)


class RandomSampler:
    """The paper's baseline: `num` RoIs per image, at most `pos_fraction` positives."""

    needs_stats = False

    def __init__(self, num: int = 512, pos_fraction: float = 0.25):
        self.num = num
        self.pos_fraction = pos_fraction

    def __call__(
        self, labels: Tensor, stats: RoIStats | None = None, generator: torch.Generator | None = None
    ) -> SampleResult:
        return balanced_sample(labels, self.num, self.pos_fraction, generator)

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

    def __call__(
        self, labels: Tensor, stats: RoIStats | None = None, generator: torch.Generator | None = None
    ) -> SampleResult:
        """Deterministic: `generator` is taken for the common call and not used."""
        if stats is None or stats.loss is None:
            raise ValueError("OHEMSampler needs RoIStats.loss")
        loss = stats.loss.detach().double()
        if self.pos_fraction is None:
            return self._hardest_of_all(labels, loss)
        chosen = top_positives(labels, loss, int(self.num * self.pos_fraction))
        return fill_slots(labels, chosen, loss, self.num)

    def _hardest_of_all(self, labels: Tensor, loss: Tensor) -> SampleResult:
        """The `num` non-ignored RoIs of highest loss, positives first within the slots."""
        eligible = labels >= 0
        slots = min(self.num, labels.numel())
        key = torch.where(eligible, loss, torch.full_like(loss, float("-inf")))
        inds = torch.topk(key, slots).indices
        valid = torch.arange(slots, device=labels.device) < eligible.sum()
        # positives first, as the other samplers lay out their slots
        pos = valid & (labels[inds] >= 1)
        order = torch.sort((~pos).to(torch.uint8), stable=True).indices
        return SampleResult(inds[order], valid[order], pos[order])

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

    def __call__(
        self, labels: Tensor, stats: RoIStats | None = None, generator: torch.Generator | None = None
    ) -> SampleResult:
        if stats is None or stats.fg_score is None or stats.pred_boxes is None or stats.bg_loss is None:
            raise ValueError("ScoreHLRSampler needs RoIStats.fg_score, pred_boxes and bg_loss")
        n = labels.numel()
        keys = random_keys(n, labels.device, generator)
        chosen = top_positives(labels, keys, int(self.num * self.pos_fraction))
        high = (labels == 0) & (stats.fg_score > self.score_thr)  # the negatives Score-HLR ranks
        hlr = score_hlr(stats.pred_boxes, stats.fg_score, self.iou_thr, valid=high)
        # high-score negatives by HLR (keys in (2, 3]) before random low-score ones ([0, 1))
        neg_key = torch.where(high, 2.0 + 1.0 / (1.0 + hlr.double()), keys)
        result = fill_slots(labels, chosen, neg_key, self.num)
        neg_slot = result.valid & ~result.is_pos
        from_hlr = high[result.inds]
        result.weights = score_hlr_slot_weights(
            hlr[result.inds],
            stats.bg_loss[result.inds],
            is_hlr=neg_slot & from_hlr,
            is_random=neg_slot & ~from_hlr,
            num_valid=high.sum(),
            k=self.k,
            bias=self.bias,
        )
        return result

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
