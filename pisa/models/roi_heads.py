"""Two-stage RoI heads with PISA training: pluggable RoI sampler, ISR-P, ISR-N and CARL.

Inference is torchvision's `RoIHeads` unchanged; only the training path differs:
proposals (plus the GT boxes) are matched as in torchvision, sampled by a `pisa.core.sampling`
sampler (OHEM / Score-HLR rank all proposals with one batched no-grad pass of the box
head), and the classification loss becomes a per-RoI weighted cross-entropy (ISR-N
weights on negatives, ISR-P weights on positives). CARL is added as its own loss term.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.ops import boxes as box_ops

from pisa.core.config import BoxLossConfig, ModelConfig
from pisa.core.sampling import DrawStream, RoIStats, build_sampler, image_generator
from pisa.models.box_head_reuse import HeadPass, can_reuse, forward_all, reuse_sampled
from pisa.models.fixed_size import pisa_matcher
from pisa.models.pisa_loss import PisaLoss, box_loss_fn

__all__ = ["PisaRoIHeads", "TORCHVISION_BOX_LOSS"]

TORCHVISION_BOX_LOSS = BoxLossConfig(type="smooth_l1", beta=1.0 / 9.0)  # torchvision's fastrcnn_loss


@dataclass
class _Samples:
    """The sampled RoIs of a batch, concatenated over images (per-image lists where needed)."""

    proposals: list[Tensor]  # per image (S_i, 4)
    matched_idxs: list[Tensor]  # per image (S_i,), index of the matched GT in its image
    labels: Tensor  # (S,)
    regression_targets: Tensor  # (S, 4)
    gt_boxes: Tensor  # (S, 4) matched GT box
    gt_inds: Tensor  # (S,) matched GT index, unique across the batch
    label_weights: Tensor  # (S,) ISR-N weights on negatives, 1 elsewhere
    head_pass: HeadPass | None = None  # the ranking pass over all proposals, when there was one
    rows: Tensor | None = None  # (S,) the sampled RoIs' rows in `head_pass`
    valid: Tensor | None = None  # (S,) bool: slots actually sampled (fixed-size samples); None: all
    isr_n: bool = False  # the sampler weighed the negatives (ISR-N)


class PisaRoIHeads(RoIHeads):
    """torchvision `RoIHeads` whose training step samples and weighs RoIs the PISA way."""

    def __init__(self, *args, cfg: ModelConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler = build_sampler(cfg)
        self.pisa = PisaLoss(cfg.isr_p, cfg.carl, cfg.diagnostics)
        self.box_loss = box_loss_fn(cfg.box_loss, TORCHVISION_BOX_LOSS)
        self.reuse_ranking_pass = True  # sampled RoIs take their head outputs from the ranking pass

    @classmethod
    def from_torchvision(cls, heads: RoIHeads, cfg: ModelConfig) -> PisaRoIHeads:
        """Wrap the modules and settings of an existing torchvision `RoIHeads`."""
        new = cls(
            heads.box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            heads.proposal_matcher.high_threshold,
            heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image,
            heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights,
            heads.score_thresh,
            heads.nms_thresh,
            heads.detections_per_img,
            mask_roi_pool=heads.mask_roi_pool,
            mask_head=heads.mask_head,
            mask_predictor=heads.mask_predictor,
            cfg=cfg,
        )
        new.proposal_matcher = pisa_matcher(heads.proposal_matcher)
        return new

    def assign_targets_to_proposals(
        self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's matching and labels (0 background, -1 ignored) by `torch.where`, not masked writes."""
        matched_idxs, labels = [], []
        for props, boxes, classes in zip(proposals, gt_boxes, gt_labels):
            if boxes.numel() == 0:  # background image
                zeros = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                matched_idxs.append(zeros)
                labels.append(zeros.clone())
                continue
            matched = self.proposal_matcher(box_ops.box_iou(boxes, props))
            label = classes[matched.clamp(min=0)].to(torch.int64)
            label = torch.where(matched == self.proposal_matcher.BELOW_LOW_THRESHOLD, 0, label)
            label = torch.where(matched == self.proposal_matcher.BETWEEN_THRESHOLDS, -1, label)
            matched_idxs.append(matched.clamp(min=0))
            labels.append(label)
        return matched_idxs, labels

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def roi_stats(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        labels: list[Tensor],
        regression_targets: list[Tensor],
    ) -> tuple[list[RoIStats], HeadPass | None]:
        """Box-head predictions over all proposals of all images, in one batched pass (and
        that pass's activations, when the head's layout lets the sampled RoIs reuse them)."""
        counts = [p.shape[0] for p in proposals]
        head_pass = None
        if self.reuse_ranking_pass and can_reuse(self.box_roi_pool, self.box_head, self.box_predictor):
            head_pass = forward_all(
                self.box_roi_pool, self.box_head, self.box_predictor, features, proposals, image_shapes
            )
            logits, deltas = head_pass.logits, head_pass.deltas
        else:
            feats = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
            logits, deltas = self.box_predictor(feats)
        logits = logits.float()
        n, num_classes = logits.shape
        deltas = deltas.float().reshape(n, num_classes, 4)
        labels_all = torch.cat(labels)
        targets = torch.cat(regression_targets).float()
        rows = torch.arange(n, device=logits.device)

        target_cls = labels_all.clamp(min=0)
        cls_loss = F.cross_entropy(logits, target_cls, reduction="none")
        reg = self.box_loss(deltas[rows, target_cls], targets).sum(1)
        loss = cls_loss + reg * (labels_all > 0)
        bg_loss = F.cross_entropy(logits, torch.zeros_like(target_cls), reduction="none")
        fg_score, fg_cls = logits.softmax(-1)[:, 1:].max(dim=1)
        fg_cls = fg_cls + 1
        boxes = torch.cat(proposals).float()
        pred_boxes = self.box_coder.decode_single(deltas[rows, fg_cls], boxes)

        self.pisa.note(roi_loss=loss, roi_labels=labels_all, num_proposals=torch.tensor(counts))
        stats = [
            RoIStats(loss=loss_i, bg_loss=b, fg_score=s, pred_boxes=p)
            for loss_i, b, s, p in zip(
                loss.split(counts), bg_loss.split(counts), fg_score.split(counts), pred_boxes.split(counts)
            )
        ]
        return stats, head_pass

    def select_pisa_samples(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> _Samples:
        """Match proposals (+ GTs) to GTs as torchvision does, then sample with `self.sampler`.
        Long because it is torchvision's `select_training_samples` with the sampler's
        inputs (scores, losses, IoUs) kept in step: split, the shared tensors would travel
        between the parts."""
        self.check_targets(targets)
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        matched_boxes = [
            (g if g.numel() else torch.zeros((1, 4), dtype=dtype, device=device))[m]
            for g, m in zip(gt_boxes, matched_idxs)
        ]
        regression_targets = list(self.box_coder.encode(matched_boxes, proposals))

        head_pass = None
        stats: Sequence[RoIStats | None]
        if self.sampler.needs_stats:
            stats, head_pass = self.roi_stats(features, proposals, image_shapes, labels, regression_targets)
        else:
            stats = [None] * len(proposals)

        gt_offset, base = 0, 0
        parts: dict[str, list[Tensor]] = {k: [] for k in ("labels", "targets", "gt", "gt_inds", "w", "valid", "rows")}
        out_props, out_matched, isr_n = [], [], False
        for i, stat in enumerate(stats):
            draws = image_generator(targets[i], device, DrawStream.ROIS)  # this image's own draws
            result = self.sampler(labels[i], stat, draws)  # fixed-size slots: no host sync
            inds = result.inds
            weights = torch.ones(inds.numel(), dtype=torch.float32, device=device)
            if result.weights is not None:
                weights, isr_n = result.weights.float(), True
            out_props.append(proposals[i][inds])
            out_matched.append(matched_idxs[i][inds])
            parts["labels"].append(labels[i][inds])
            parts["targets"].append(regression_targets[i][inds])
            parts["gt"].append(matched_boxes[i][inds])
            parts["gt_inds"].append(matched_idxs[i][inds] + gt_offset)
            parts["w"].append(weights)
            parts["valid"].append(result.valid)
            parts["rows"].append(inds + base)  # into the concatenated proposals (+ GTs), as `roi_loss`
            gt_offset += gt_boxes[i].shape[0]
            base += proposals[i].shape[0]

        rows, valid = torch.cat(parts["rows"]), torch.cat(parts["valid"])
        self.pisa.note(num_sampled=torch.stack([v.sum() for v in parts["valid"]]))
        self.pisa.note_masked(valid, sampled_inds=rows)
        return _Samples(
            proposals=out_props,
            matched_idxs=out_matched,
            labels=torch.cat(parts["labels"]),
            regression_targets=torch.cat(parts["targets"]),
            gt_boxes=torch.cat(parts["gt"]),
            gt_inds=torch.cat(parts["gt_inds"]),
            label_weights=torch.cat(parts["w"]),
            head_pass=head_pass,
            rows=rows,
            valid=valid,
            isr_n=isr_n,
        )

    # ------------------------------------------------------------------ losses

    def pisa_box_loss(self, class_logits: Tensor, box_regression: Tensor, s: _Samples) -> dict[str, Tensor]:
        """Weighted CE + box loss (+ CARL), each normalized by the number of sampled RoIs.

        Fixed-size: every slot is computed and masks (`valid`, positives) weigh them, which
        sums to the losses over the selected RoIs without selecting them (no host sync)."""
        class_logits = class_logits.float()
        n = class_logits.shape[0]
        valid = s.valid if s.valid is not None else torch.ones(n, dtype=torch.bool, device=class_logits.device)
        labels = s.labels.clamp(min=0)  # unused slots may hold ignored proposals (-1)
        num = valid.sum().clamp_min(1).to(class_logits.dtype)
        cls_loss = F.cross_entropy(class_logits, labels, reduction="none")
        weights = torch.where(valid, s.label_weights.to(cls_loss.dtype), torch.zeros_like(cls_loss))

        pos = valid & (labels > 0)
        deltas = box_regression.reshape(n, -1, 4)[torch.arange(n, device=labels.device), labels]
        reg = self.box_loss(deltas, s.regression_targets)
        reg = torch.where(pos[:, None], reg, torch.zeros_like(reg))

        w_pos = self.pisa.positive_weights(
            self.box_coder,
            deltas,
            torch.cat(s.proposals),
            s.gt_boxes,
            labels,
            s.gt_inds,
            cls_loss,
            valid=pos,
        )
        if w_pos is not None:
            weights = torch.where(pos, w_pos.to(weights.dtype), weights)
        if s.isr_n:
            self.pisa.note_masked(valid & (labels == 0), isr_n_weights=s.label_weights)

        losses = {
            "loss_classifier": (cls_loss * weights).sum() / num,
            "loss_box_reg": reg.sum() / num,
        }
        cls_prob = class_logits.softmax(-1).gather(1, labels[:, None]).squeeze(1)
        carl = self.pisa.carl_term(cls_prob, reg, avg_factor=num, valid=pos)
        if carl is not None:
            losses["loss_carl"] = carl
        return losses

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("targets should not be None in training")
        for t in targets:
            if not t["boxes"].is_floating_point():
                raise TypeError(f"target boxes must be of float type, got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must be of int64 type, got {t['labels'].dtype}")

        self.pisa.start_step()
        samples = self.select_pisa_samples(features, proposals, image_shapes, targets)
        if samples.head_pass is not None:
            class_logits, box_regression = reuse_sampled(
                self.box_roi_pool,
                self.box_head,
                self.box_predictor,
                features,
                samples.proposals,
                samples.head_pass,
                cast(Tensor, samples.rows),
            )
        else:
            box_features = self.box_head(self.box_roi_pool(features, samples.proposals, image_shapes))
            class_logits, box_regression = self.box_predictor(box_features)
        losses = self.pisa_box_loss(class_logits, box_regression, samples)

        if self.has_mask():
            counts = [p.shape[0] for p in samples.proposals]
            mask_proposals, pos_matched_idxs = [], []
            valid = samples.valid if samples.valid is not None else torch.ones_like(samples.labels, dtype=torch.bool)
            pos_masks = ((samples.labels > 0) & valid).split(counts)
            for props, matched, pos_mask in zip(samples.proposals, samples.matched_idxs, pos_masks):
                pos = torch.where(pos_mask)[0]  # mask loss over variable positives: a sync per image
                mask_proposals.append(props[pos])
                pos_matched_idxs.append(matched[pos])
            mask_logits = self.mask_predictor(
                self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
            )
            losses["loss_mask"] = maskrcnn_loss(
                mask_logits,
                mask_proposals,
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],
                pos_matched_idxs,
            )
        return [], losses
