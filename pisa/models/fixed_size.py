"""torchvision's training-time matching and RPN without host syncs (same results).

torchvision labels anchors/proposals by boolean-mask assignment (`t[mask] = v`), finds the
low-quality matches with `torch.where(cond)`, samples the RPN's anchors with `nonzero` +
`randperm` and filters proposals by `nonzero` before NMS. On a GPU each of those waits for
the device. Here the same results come from fixed-size ops: `torch.where(cond, a, b)`,
top-k over random keys with a validity mask, and a masked NMS whose only wait is NMS's own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops
from torchvision.ops import nms
from torchvision.transforms.v2 import functional as TF

from pisa.core.sampling import DrawStream, balanced_sample, image_generator

BoxLossFn = Callable[[Tensor, Tensor], Tensor]


def _torchvision_rpn_box_loss(pred: Tensor, target: Tensor) -> Tensor:
    """torchvision's RPN box loss, element-wise: smooth-L1 with beta 1/9."""
    return F.smooth_l1_loss(pred, target, beta=1 / 9, reduction="none")


__all__ = ["PisaMatcher", "PisaRPN", "PisaTransform", "level_nms", "pisa_matcher"]


class PisaMatcher(det_utils.Matcher):
    """torchvision's `Matcher` with `torch.where` for its masked writes: same matches."""

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        if match_quality_matrix.numel() == 0:
            return super().__call__(match_quality_matrix)  # torchvision's errors
        matched_vals, matches = match_quality_matrix.max(dim=0)
        all_matches = matches
        below = matched_vals < self.low_threshold
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches = torch.where(below, torch.full_like(matches, self.BELOW_LOW_THRESHOLD), matches)
        matches = torch.where(between, torch.full_like(matches, self.BETWEEN_THRESHOLDS), matches)
        if self.allow_low_quality_matches:
            # each GT's best predictions (ties included) keep their best GT
            highest = match_quality_matrix.max(dim=1).values
            best_of_some_gt = (match_quality_matrix == highest[:, None]).any(dim=0)
            matches = torch.where(best_of_some_gt, all_matches, matches)
        return matches


def pisa_matcher(matcher: det_utils.Matcher) -> PisaMatcher:
    """A `PisaMatcher` with the thresholds of `matcher`."""
    return PisaMatcher(matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches)


def level_nms(boxes: Tensor, scores: Tensor, levels: Tensor, iou_thr: float) -> Tensor:
    """NMS inside each level in one call (torchvision's coordinate offset trick).

    `batched_nms` switches to a loop over `unique(levels)` with a `where` per level above
    4000 boxes on CPU / 20000 on GPU: a wait per level. One offset NMS waits once."""
    offsets = levels.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_thr)


class PisaTransform(GeneralizedRCNNTransform):
    """torchvision's transform that takes uint8 images too, draws no random size when there is
    only one to choose, and does not resize an image already at the fixed input size."""

    def normalize(self, image: Tensor) -> Tensor:
        """uint8 images are scaled to [0, 1] here, on their device (the loader hands them over
        as uint8: a quarter of float32's bytes to copy); float images in [0, 1] as before."""
        if image.dtype == torch.uint8:
            image = TF.to_dtype(image, torch.float32, scale=True)  # the loader's former conversion
        return super().normalize(image)

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        """No interpolation (an identity, kernel and copy included) when the loader already
        resized to the fixed size; any other image is resized by torchvision as before."""
        if self.fixed_size is not None and tuple(image.shape[-2:]) == (self.fixed_size[1], self.fixed_size[0]):
            return image, target
        return super().resize(image, target)

    def torch_choice(self, k: list[int]) -> int:
        # torchvision draws `int(uniform(0, len(k)))` with an `.item()` even for one size
        return k[0] if len(k) == 1 else super().torch_choice(k)

    @classmethod
    def from_torchvision(cls, t: GeneralizedRCNNTransform) -> PisaTransform:
        """The same settings as `t`."""
        return cls(
            t.min_size,
            t.max_size,
            t.image_mean,
            t.image_std,
            size_divisible=t.size_divisible,
            fixed_size=t.fixed_size,
            _skip_resize=t._skip_resize,
        )


class PisaRPN(RegionProposalNetwork):
    """torchvision's RPN whose training step selects with fixed-size ops (inference unchanged)."""

    _anchor_draws: list[torch.Generator | None] | None = None  # this step's, per image

    box_loss: BoxLossFn | None = None  # None: torchvision's smooth-L1 beta 1/9

    @classmethod
    def from_torchvision(cls, rpn: RegionProposalNetwork, box_loss: BoxLossFn | None = None) -> PisaRPN:
        """Wrap the modules and settings of an existing RPN; `box_loss` (element-wise, as
        `pisa_loss.box_loss_fn` makes) replaces torchvision's smooth-L1 beta 1/9."""
        new = cls(
            rpn.anchor_generator,
            rpn.head,
            rpn.proposal_matcher.high_threshold,
            rpn.proposal_matcher.low_threshold,
            rpn.fg_bg_sampler.batch_size_per_image,
            rpn.fg_bg_sampler.positive_fraction,
            dict(rpn._pre_nms_top_n),
            dict(rpn._post_nms_top_n),
            rpn.nms_thresh,
            rpn.score_thresh,
        )
        new.box_coder = rpn.box_coder
        new.min_size = rpn.min_size
        new.proposal_matcher = pisa_matcher(rpn.proposal_matcher)
        new.box_loss = box_loss
        return new

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's labels (1 fg, 0 bg, -1 between thresholds) by `torch.where`. Also takes
        each image's anchor-sampling generator from its target, for `compute_loss` (which
        torchvision's `forward` calls without the targets) to use next."""
        self._anchor_draws = [image_generator(t, anchors[0].device, DrawStream.ANCHORS) for t in targets]
        labels, matched_gt_boxes = [], []
        for anchors_per_image, targets_per_image in zip(anchors, targets):
            gt_boxes = targets_per_image["boxes"]
            if gt_boxes.numel() == 0:
                labels.append(anchors_per_image.new_zeros(anchors_per_image.shape[0], dtype=torch.float32))
                matched_gt_boxes.append(torch.zeros_like(anchors_per_image, dtype=torch.float32))
                continue
            matched_idxs = self.proposal_matcher(self.box_similarity(gt_boxes, anchors_per_image))
            matched_gt_boxes.append(gt_boxes[matched_idxs.clamp(min=0)])
            label = (matched_idxs >= 0).to(torch.float32)
            between = matched_idxs == self.proposal_matcher.BETWEEN_THRESHOLDS
            labels.append(torch.where(between, torch.full_like(label, -1.0), label))
        return labels, matched_gt_boxes

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's filtering; in training small and low-scoring boxes are masked, not removed."""
        if not self.training:
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat(
            [torch.full((n,), idx, dtype=torch.int64, device=device) for idx, n in enumerate(num_anchors_per_level)]
        ).reshape(1, -1)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=device)[:, None]
        scores_all = torch.sigmoid(objectness[batch_idx, top_n_idx])
        levels = levels.expand_as(objectness)[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]
        final_boxes, final_scores = [], []
        for boxes, scores, lvl, img_shape in zip(proposals, scores_all, levels, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, img_shape)
            keep = self._masked_nms(boxes, scores, lvl, len(num_anchors_per_level))
            keep = keep[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores

    def _masked_nms(self, boxes: Tensor, scores: Tensor, lvl: Tensor, num_levels: int) -> Tensor:
        """The boxes NMS keeps among those torchvision would keep before it, by score.

        Dropped boxes (small, low-scoring) become one identical dummy box at score -inf in a
        level of their own, plus one more such box appended: NMS meets them after every real
        box (so they change nothing), keeps exactly one of them, and lists it last."""
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ok = (widths >= self.min_size) & (heights >= self.min_size) & (scores >= self.score_thresh)
        dummy = boxes.new_tensor([[0.0, 0.0, 1.0, 1.0]])
        dropped_level = lvl.new_full((1,), num_levels)
        never = scores.new_full((1,), float("-inf"))
        boxes = torch.cat([torch.where(ok[:, None], boxes, dummy), dummy])
        scores = torch.cat([torch.where(ok, scores, never), never])
        lvl = torch.cat([torch.where(ok, lvl, dropped_level), dropped_level])
        keep = level_nms(boxes, scores, lvl, self.nms_thresh)
        return keep[:-1]

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """torchvision's RPN losses over fixed-size samples (`balanced_sample`) weighted by validity."""
        num, fraction = self.fg_bg_sampler.batch_size_per_image, self.fg_bg_sampler.positive_fraction
        draws = self._anchor_draws or [None] * len(labels)
        self._anchor_draws = None  # used once: the next step's targets bring their own
        inds, valid, base = [], [], 0
        for labels_per_image, generator in zip(labels, draws):
            sample = balanced_sample(labels_per_image, num, fraction, generator)
            inds.append(sample.inds + base)
            valid.append(sample.valid)
            base += labels_per_image.numel()
        rows = torch.cat(inds)
        weight = torch.cat(valid).to(objectness.dtype)
        sampled_labels = torch.cat(labels)[rows]
        positive = (weight > 0) & (sampled_labels >= 1)
        count = weight.sum().clamp_min(1.0)
        loss_fn = self.box_loss or _torchvision_rpn_box_loss
        box_loss = loss_fn(pred_bbox_deltas[rows], torch.cat(regression_targets)[rows]).sum(1)
        # `where`, not a product: a background image's regression targets are infinite
        box_loss = torch.where(positive, box_loss, torch.zeros_like(box_loss))
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[rows], sampled_labels.clamp(min=0), reduction="none"
        )
        return (objectness_loss * weight).sum() / count, box_loss.sum() / count
