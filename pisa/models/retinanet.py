"""RetinaNet with a PISA head: ISR-P reweights the focal loss of positives, CARL adds `loss_carl`.

The head replaces torchvision's per-image loss loops with one pass over the whole batch,
because ISR-P ranks positives across images (IoU-HLR groups by class over the batch).
As in the reference PISA RetinaNet (mmdetection's `PISARetinaHead`), the classification, box
and CARL losses are divided by the positives of this worker's batch (`num_total_pos`, a GPU's
in the reference), not per image: only then does ISR-P's "keep the positives' total loss" hold
for the batch loss. P6 is computed from C5 and P7 from P6 without a ReLU between them
(mmdetection's FPN with `add_extra_convs='on_input'`). Single-stage models get no ISR-N.
"""

from __future__ import annotations

from functools import partial
from typing import cast

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.retinanet import (
    RetinaNet,
    RetinaNetHead,
    _default_anchorgen,
)
from torchvision.ops import sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from pisa.core.config import BoxLossConfig, ModelConfig
from pisa.models.backbones import build_backbone, resolve_norm
from pisa.models.fixed_size import PisaTransform, pisa_matcher
from pisa.models.pisa_loss import (
    AnchorPositives,
    DiagnosticsMixin,
    PisaLoss,
    box_loss_fn,
)

__all__ = ["P6P7FromC5", "PISARetinaNetHead", "PISARetinaNet", "build_retinanet", "TORCHVISION_BOX_LOSS"]

TORCHVISION_BOX_LOSS = BoxLossConfig(type="l1")  # torchvision's RetinaNet regression loss


class P6P7FromC5(ExtraFPNBlock):
    """P6 = 3x3/2 conv of C5, P7 = 3x3/2 conv of P6, no ReLU between (mmdetection's RetinaNet FPN;
    torchvision's `LastLevelP6P7` puts a ReLU before P7). Initialised as torchvision's."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for module in (self.p6, self.p7):
            nn.init.kaiming_uniform_(module.weight, a=1)
            nn.init.zeros_(cast(Tensor, module.bias))

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(c[-1])
        p7 = self.p7(p6)
        return [*p, p6, p7], [*names, "p6", "p7"]


class PISARetinaNetHead(RetinaNetHead):
    """torchvision's RetinaNet head whose loss applies ISR-P and CARL, batch-normalised.

    With both disabled and one image per batch the losses equal torchvision's.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        cfg: ModelConfig | None = None,
        norm_layer=None,
    ):
        """The PISA settings (`isr_p`, `carl`, `box_loss`, `diagnostics`) come from `cfg`, as
        `PisaRoIHeads` takes them; without one, plain RetinaNet losses."""
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        cfg = cfg or ModelConfig()
        self.pisa = PisaLoss(cfg.isr_p, cfg.carl, cfg.diagnostics)
        self.box_loss = box_loss_fn(cfg.box_loss, TORCHVISION_BOX_LOSS)

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        cls_logits = head_outputs["cls_logits"].float()  # (N, A, C)
        bbox_regression = head_outputs["bbox_regression"].float()  # (N, A, 4)
        box_coder = self.regression_head.box_coder
        self.pisa.start_step()
        pos = AnchorPositives(targets, matched_idxs)
        num_total_pos = max(1, len(pos))  # this worker's positives, as the reference's per GPU

        # classification: per-anchor focal loss summed over classes, ignored anchors dropped
        gt_classes_target = torch.zeros_like(cls_logits)
        gt_classes_target[pos.img_idx, pos.anchor_idx, pos.labels] = 1.0
        focal = sigmoid_focal_loss(cls_logits, gt_classes_target, reduction="none").sum(-1)  # (N, A)
        weights = (pos.matched != det_utils.Matcher.BETWEEN_THRESHOLDS).to(focal.dtype)

        # regression on the encoded targets, per positive (P, 4)
        pos_anchors = pos.select(torch.stack(anchors)).float()
        pos_deltas = pos.select(bbox_regression)
        target_deltas = box_coder.encode_single(pos.gt_boxes.float(), pos_anchors)
        reg_loss = self.box_loss(pos_deltas, target_deltas)

        w = self.pisa.positive_weights(
            box_coder, pos_deltas, pos_anchors, pos.gt_boxes, pos.labels, pos.gt_inds, pos.select(focal)
        )
        if w is not None:
            weights = weights.index_put((pos.img_idx, pos.anchor_idx), w.to(weights.dtype))

        losses = {
            "classification": (focal * weights).sum() / num_total_pos,
            "bbox_regression": reg_loss.sum() / num_total_pos,
        }
        cls_prob = torch.sigmoid(cls_logits[pos.img_idx, pos.anchor_idx, pos.labels])
        carl = self.pisa.carl_term(cls_prob, reg_loss, avg_factor=num_total_pos)
        if carl is not None:
            losses["loss_carl"] = carl
        return losses


class PISARetinaNet(DiagnosticsMixin, RetinaNet):
    """torchvision RetinaNet that never detects logit 0 (background) and exposes PISA diagnostics."""

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        no_background = [cl.clone() for cl in head_outputs["cls_logits"]]
        for cl in no_background:
            cl[..., 0] = float("-inf")
        head_outputs = {**head_outputs, "cls_logits": no_background}
        return super().postprocess_detections(head_outputs, anchors, image_shapes)


def build_retinanet(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """RetinaNet on the configured FPN backbone: P3-P5 from C3-C5, P6 and P7 from C5 (`P6P7FromC5`).

    `num_classes` counts foreground classes; the head predicts `num_classes + 1` logits so
    that dataset labels 1..K index them directly, as torchvision's COCO RetinaNet does
    (logit 0 is never a positive and never reported as a detection).
    """
    backbone = build_backbone(cfg, returned_layers=(2, 3, 4))
    backbone.fpn.extra_blocks = P6P7FromC5(backbone.in_channels_list[-1], backbone.out_channels)
    anchor_generator = _default_anchorgen()  # 5 levels x 9 anchors, sizes 32..512
    norm_layer = None if resolve_norm(cfg) == "frozen_bn" else partial(nn.GroupNorm, 32)
    head = PISARetinaNetHead(
        backbone.out_channels,
        anchor_generator.num_anchors_per_location()[0],
        num_classes + 1,
        cfg,
        norm_layer=norm_layer,
    )
    model = PISARetinaNet(
        backbone,
        num_classes + 1,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        anchor_generator=anchor_generator,
        head=head,
        score_thresh=cfg.score_thresh,
        detections_per_img=cfg.detections_per_img,
    )
    # the same matching and transform without host syncs (`torch.where`, no random size draw)
    model.proposal_matcher = pisa_matcher(model.proposal_matcher)
    model.transform = PisaTransform.from_torchvision(model.transform)
    return model
