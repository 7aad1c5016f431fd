"""RetinaNet with a PISA head: ISR-P reweights the focal loss of positives, CARL adds `loss_carl`.

The head replaces torchvision's per-image loss loops with one pass over the whole batch,
because ISR-P ranks positives across images (IoU-HLR groups by class over the batch).
Normalisation stays torchvision's: each image's losses are divided by its number of
foreground anchors, then averaged over images. Single-stage models get no ISR-N.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead, _default_anchorgen
from torchvision.ops import sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from pisa.config import CARLConfig, ISRPConfig, ModelConfig
from pisa.models.backbones import build_backbone, resolve_norm
from pisa.ops import carl_loss, iou_hlr, isr_p_weights

__all__ = [
    "aligned_box_iou",
    "Positives",
    "PISARetinaNetHead",
    "PISARetinaNet",
    "build_retinanet",
]


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of each box in `boxes1` with the box at the same row of `boxes2` (x1y1x2y2)."""
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area1 + area2 - inter).clamp(min=1e-6)


class Positives:
    """The foreground anchors of a batch, flattened: which image, which anchor, which GT.

    `gt_inds` index the concatenation of all images' GTs, so they are unique across the
    batch as IoU-HLR requires.
    """

    def __init__(self, targets: list[dict[str, Tensor]], matched_idxs: list[Tensor]):
        matched = torch.stack(matched_idxs)  # (N, A)
        self.matched = matched
        self.mask = matched >= 0
        self.img_idx, self.anchor_idx = self.mask.nonzero(as_tuple=True)
        counts = torch.tensor([len(t["boxes"]) for t in targets], device=matched.device)
        offsets = torch.cumsum(counts, 0) - counts
        self.gt_inds = offsets[self.img_idx] + matched[self.img_idx, self.anchor_idx]
        all_boxes = torch.cat([t["boxes"] for t in targets])
        all_labels = torch.cat([t["labels"] for t in targets])
        self.gt_boxes = all_boxes[self.gt_inds]
        self.labels = all_labels[self.gt_inds].long()
        self.num_per_image = self.mask.sum(1)  # (N,)

    def __len__(self) -> int:
        return int(self.img_idx.numel())

    def select(self, per_anchor: Tensor) -> Tensor:
        """Rows of a (N, A, ...) tensor at the positives."""
        return per_anchor[self.img_idx, self.anchor_idx]

    def sum_per_image(self, values: Tensor, num_images: int) -> Tensor:
        """Sum of per-positive values (P,) into (N,) image totals."""
        return values.new_zeros(num_images).index_add_(0, self.img_idx, values)


class PISARetinaNetHead(RetinaNetHead):
    """torchvision's RetinaNet head whose loss applies ISR-P and CARL.

    With both disabled the losses equal torchvision's. `pisa_diagnostics` holds the last
    training step's ISR-P inputs and weights and the CARL weights (detached, CPU).
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        norm_layer=None,
        isr_p: ISRPConfig | None = None,
        carl: CARLConfig | None = None,
        diagnostics: bool = True,
    ):
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        self.isr_p = isr_p or ISRPConfig()
        self.carl = carl or CARLConfig()
        self.diagnostics = diagnostics
        self.pisa_diagnostics: dict[str, Tensor] = {}

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        cls_logits = head_outputs["cls_logits"]  # (N, A, C)
        bbox_regression = head_outputs["bbox_regression"]  # (N, A, 4)
        box_coder = self.regression_head.box_coder
        num_images = cls_logits.shape[0]
        pos = Positives(targets, matched_idxs)
        per_image_norm = pos.num_per_image.clamp(min=1).to(cls_logits.dtype)
        diag: dict[str, Tensor] = {}

        # classification: per-anchor focal loss summed over classes, ignored anchors dropped
        gt_classes_target = torch.zeros_like(cls_logits)
        gt_classes_target[pos.img_idx, pos.anchor_idx, pos.labels] = 1.0
        focal = sigmoid_focal_loss(cls_logits, gt_classes_target, reduction="none").sum(-1)  # (N, A)
        valid = pos.matched != det_utils.Matcher.BETWEEN_THRESHOLDS
        weights = valid.to(focal.dtype)

        # regression: L1 on the encoded targets, per positive (P, 4)
        pos_anchors = pos.select(torch.stack(anchors))
        pos_deltas = pos.select(bbox_regression)
        target_deltas = box_coder.encode_single(pos.gt_boxes, pos_anchors)
        reg_loss = F.l1_loss(pos_deltas, target_deltas, reduction="none")

        if self.isr_p.enabled and len(pos) > 0:
            with torch.no_grad():
                pred_boxes = box_coder.decode_single(pos_deltas.detach(), pos_anchors)
                ious = aligned_box_iou(pred_boxes, pos.gt_boxes)
            pos_cls_loss = pos.select(focal).detach()
            w = isr_p_weights(ious, pos.labels, pos.gt_inds, pos_cls_loss, k=self.isr_p.k, bias=self.isr_p.bias)
            weights = weights.index_put((pos.img_idx, pos.anchor_idx), w.to(weights.dtype))
            if self.diagnostics:
                diag.update(
                    ious=ious, labels=pos.labels, gt_inds=pos.gt_inds, cls_loss=pos_cls_loss,
                    isr_p_weights=w, iou_hlr=iou_hlr(ious, pos.labels, pos.gt_inds),
                )

        cls_per_image = (focal * weights).sum(1) / per_image_norm
        reg_per_image = pos.sum_per_image(reg_loss.sum(1), num_images) / per_image_norm
        losses = {"classification": cls_per_image.mean(), "bbox_regression": reg_per_image.mean()}

        if self.carl.enabled:
            cls_prob = torch.sigmoid(cls_logits[pos.img_idx, pos.anchor_idx, pos.labels])
            losses["loss_carl"] = carl_loss(
                cls_prob, reg_loss, k=self.carl.k, bias=self.carl.bias, avg_factor=max(1, len(pos))
            )
            if self.diagnostics and len(pos) > 0:
                with torch.no_grad():
                    v = (self.carl.bias + (1.0 - self.carl.bias) * cls_prob).pow(self.carl.k)
                    diag["carl_weights"] = v * (len(pos) / v.sum())

        if self.diagnostics:
            self.pisa_diagnostics = {k: v.detach().cpu() for k, v in diag.items()}
        return losses


class PISARetinaNet(RetinaNet):
    """torchvision RetinaNet that never detects logit 0 (background) and exposes PISA diagnostics."""

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        no_background = [cl.clone() for cl in head_outputs["cls_logits"]]
        for cl in no_background:
            cl[..., 0] = float("-inf")
        head_outputs = {**head_outputs, "cls_logits": no_background}
        return super().postprocess_detections(head_outputs, anchors, image_shapes)

    def pisa_diagnostics(self) -> dict[str, Tensor]:
        return dict(getattr(self.head, "pisa_diagnostics", {}))


def build_retinanet(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """RetinaNet on the configured FPN backbone (P3-P7, as torchvision's retinanet_resnet50_fpn).

    `num_classes` counts foreground classes; the head predicts `num_classes + 1` logits so
    that dataset labels 1..K index them directly, as torchvision's COCO RetinaNet does
    (logit 0 is never a positive and never reported as a detection).
    """
    backbone = build_backbone(cfg, returned_layers=(2, 3, 4), extra_blocks=LastLevelP6P7(256, 256))
    anchor_generator = _default_anchorgen()  # 5 levels x 9 anchors, sizes 32..512
    norm_layer = None if resolve_norm(cfg) == "frozen_bn" else partial(nn.GroupNorm, 32)
    head = PISARetinaNetHead(
        backbone.out_channels,
        anchor_generator.num_anchors_per_location()[0],
        num_classes + 1,
        norm_layer=norm_layer,
        isr_p=cfg.isr_p,
        carl=cfg.carl,
        diagnostics=cfg.diagnostics,
    )
    return PISARetinaNet(
        backbone,
        num_classes + 1,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        anchor_generator=anchor_generator,
        head=head,
        score_thresh=cfg.score_thresh,
        detections_per_img=cfg.detections_per_img,
    )
