"""SSD300 / SSD512 on VGG16 with a PISA loss: ISR-P on positive default boxes, CARL as `loss_carl`.

As in mmdetection's PISA SSD, ISR-P reweights the softmax cross-entropy of the positives
while hard negative mining (3 negatives per positive, ranked by their unweighted loss)
is left as it is. SSD512 follows the SSD paper: 7 feature maps (64..1 cells at 512 px)
with every extra layer halving the map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead, _vgg_extractor, _xavier_init
from torchvision.ops import boxes as box_ops

from pisa.core.config import BoxLossConfig, ModelConfig
from pisa.core.errors import BackboneLoadError
from pisa.models.fixed_size import PisaTransform
from pisa.models.pisa_loss import (
    AnchorPositives,
    DiagnosticsMixin,
    PisaLoss,
    box_loss_fn,
)

__all__ = [
    "PISASSDHead",
    "PISASSD",
    "build_ssd",
    "fixed_input_size",
    "ssd_feature_sizes",
    "SSD_SPECS",
    "TORCHVISION_BOX_LOSS",
]

TORCHVISION_BOX_LOSS = BoxLossConfig(type="smooth_l1", beta=1.0)  # torchvision's (and the reference's) SSD loss

# nominal input size, aspect ratios, scales (fraction of the input; one more than maps), steps (px)
SSD_SPECS: dict[str, dict[str, Any]] = {
    "ssd300": dict(
        size=300,
        aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        steps=[8, 16, 32, 64, 100, 300],
    ),
    # SSD paper / mmdetection COCO SSD512: basesize ratios 0.1..0.9, first level 0.04
    "ssd512": dict(
        size=512,
        aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.04, 0.1, 0.26, 0.42, 0.58, 0.74, 0.9, 1.06],
        steps=[8, 16, 32, 64, 128, 256, 512],
    ),
}
_OUT_CHANNELS = {
    "ssd300": [512, 1024, 512, 256, 256, 256],
    "ssd512": [512, 1024, 512, 256, 256, 256, 256],
}
# torchvision's ssd300_vgg16 input normalisation (Caffe VGG: mean in 0-1 units, std undoes /255)
_IMAGE_MEAN = [0.48235, 0.45882, 0.40784]
_IMAGE_STD = [1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0]


def _conv_out(n: int, kernel: int, stride: int = 1, padding: int = 0, ceil: bool = False) -> int:
    num = n + 2 * padding - kernel
    return (-(-num // stride) if ceil else num // stride) + 1


def ssd_feature_sizes(detector: str, size: int) -> list[int]:
    """Side of each SSD feature map for a square input of `size` pixels."""
    n = size
    for ceil in (False, False, True):  # pool1, pool2, pool3 (ceil mode) -> conv4_3
        n = _conv_out(n, 2, 2, ceil=ceil)
    sizes = [n]
    n = _conv_out(n, 2, 2)  # pool4 -> conv5, fc6/fc7 keep the size
    sizes.append(n)
    if detector == "ssd300":
        extras = [(3, 2, 1), (3, 2, 1), (3, 1, 0), (3, 1, 0)]
    else:
        extras = [(3, 2, 1)] * 4 + [(4, 1, 1)]
    for kernel, stride, padding in extras:
        n = _conv_out(n, kernel, stride, padding)
        sizes.append(n)
    return sizes


def _extra_block(in_channels: int, mid: int, out: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, out, kernel_size=kernel, stride=stride, padding=padding),
        nn.ReLU(inplace=True),
    )


def _vgg16(spec: str | None) -> nn.Module:
    """VGG16, random unless `spec` names a torchvision VGG16 weights enum or a local state_dict."""
    if not spec:
        return torchvision.models.vgg16(weights=None)
    path = Path(spec).expanduser()
    if spec.endswith((".pth", ".pt")) or path.exists():
        vgg = torchvision.models.vgg16(weights=None)
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise BackboneLoadError(f"pretrained_backbone {path} holds a {type(state).__name__}, not a state_dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        own = vgg.state_dict()
        features = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
        missing = [k for k in own if k.startswith("features.") and k not in features]
        if missing:
            raise BackboneLoadError(f"pretrained_backbone {path} is not a VGG16 state_dict (missing {missing[:3]})")
        vgg.load_state_dict(features, strict=False)
        return vgg
    weights = torchvision.models.get_weight(spec)
    if not type(weights).__name__.startswith("VGG16_"):
        raise BackboneLoadError(f"pretrained_backbone {spec!r} is not a VGG16 weights enum")
    return torchvision.models.vgg16(weights=weights)


def build_vgg_backbone(cfg: ModelConfig) -> nn.Module:
    """torchvision's SSD VGG16 extractor; for SSD512 the paper's extra layers."""
    trainable = cfg.trainable_backbone_layers if cfg.pretrained_backbone else 5
    backbone = _vgg_extractor(_vgg16(cfg.pretrained_backbone), False, trainable)
    if cfg.detector == "ssd512":
        # conv10_2 and conv11_2 halve the map (3x3, stride 2, pad 1), conv12_2 is 4x4 pad 1
        backbone.extra[3] = _extra_block(256, 128, 256, 3, 2, 1)
        backbone.extra[4] = _extra_block(256, 128, 256, 3, 2, 1)
        backbone.extra.append(_extra_block(256, 128, 256, 4, 1, 1))
        _xavier_init(backbone.extra[3:])
    return backbone


class PISASSDHead(SSDHead):
    """torchvision's SSD head plus the SSD loss with ISR-P and CARL.

    With both disabled the losses equal torchvision's `SSD.compute_loss` (normalised by the
    positives of the batch, as the reference SSD).
    """

    def __init__(
        self,
        in_channels: list[int],
        num_anchors: list[int],
        num_classes: int,
        cfg: ModelConfig | None = None,
    ):
        """The PISA settings (`isr_p`, `carl`, `box_loss`, `diagnostics`) come from `cfg`, as
        `PisaRoIHeads` takes them; without one, plain SSD losses."""
        super().__init__(in_channels, num_anchors, num_classes)
        cfg = cfg or ModelConfig()
        self.pisa = PisaLoss(cfg.isr_p, cfg.carl, cfg.diagnostics)
        self.box_loss = box_loss_fn(cfg.box_loss, TORCHVISION_BOX_LOSS)

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
        box_coder: det_utils.BoxCoder,
        neg_to_pos_ratio: float,
    ) -> dict[str, Tensor]:
        cls_logits = head_outputs["cls_logits"].float()  # (N, A, C+1)
        bbox_regression = head_outputs["bbox_regression"].float()  # (N, A, 4)
        self.pisa.start_step()
        pos = AnchorPositives(targets, matched_idxs)
        normalizer = max(1, len(pos))

        pos_anchors = pos.select(torch.stack(anchors)).float()
        pos_deltas = pos.select(bbox_regression)
        target_deltas = box_coder.encode_single(pos.gt_boxes.float(), pos_anchors)
        reg_loss = self.box_loss(pos_deltas, target_deltas)  # (P, 4)

        cls_targets = torch.zeros(pos.mask.shape, dtype=torch.long, device=cls_logits.device)
        cls_targets[pos.img_idx, pos.anchor_idx] = pos.labels
        num_classes = cls_logits.size(-1)
        cls_loss = F.cross_entropy(cls_logits.reshape(-1, num_classes), cls_targets.reshape(-1), reduction="none").view(
            cls_targets.shape
        )  # (N, A)
        pos_cls_loss = pos.select(cls_loss)
        w = self.pisa.positive_weights(
            box_coder, pos_deltas, pos_anchors, pos.gt_boxes, pos.labels, pos.gt_inds, pos_cls_loss
        )
        if w is not None:
            pos_cls_loss = pos_cls_loss * w.to(pos_cls_loss.dtype)

        # hard negative mining on the (never reweighted) negatives, as torchvision's SSD
        num_negative = neg_to_pos_ratio * pos.mask.sum(1, keepdim=True)
        negative_loss = cls_loss.detach().clone()
        negative_loss[pos.mask] = -float("inf")
        _, order = negative_loss.sort(1, descending=True)
        hard_negatives = order.sort(1)[1] < num_negative

        losses = {
            "bbox_regression": reg_loss.sum() / normalizer,
            "classification": (pos_cls_loss.sum() + cls_loss[hard_negatives].sum()) / normalizer,
        }
        cls_prob = F.softmax(pos.select(cls_logits), dim=-1).gather(1, pos.labels[:, None]).squeeze(1)
        carl = self.pisa.carl_term(cls_prob, reg_loss, avg_factor=normalizer)
        if carl is not None:
            losses["loss_carl"] = carl
        return losses


class PISASSD(DiagnosticsMixin, SSD):
    """torchvision SSD whose loss is computed by the PISA head. With `nms_pre` its test-time
    candidates are mmdetection's: per feature level, the `nms_pre` default boxes of highest
    foreground score, then every class above `score_thresh` into one class-wise NMS."""

    nms_pre: int | None = None  # None: torchvision's `topk_candidates` per class
    anchors_per_level: tuple[int, ...] = ()  # default boxes per feature level, in head order

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        return self.head.compute_loss(
            targets, head_outputs, anchors, matched_idxs, self.box_coder, self.neg_to_pos_ratio
        )

    def postprocess_detections(
        self, head_outputs: dict[str, Tensor], image_anchors: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        if self.nms_pre is None:
            return super().postprocess_detections(head_outputs, image_anchors, image_shapes)
        probs = F.softmax(head_outputs["cls_logits"], dim=-1)[..., 1:]  # (N, A, C) foreground
        detections = []
        for deltas, scores, anchors, shape in zip(head_outputs["bbox_regression"], probs, image_anchors, image_shapes):
            keep = self._candidates(scores.max(dim=1).values)
            boxes = self.box_coder.decode_single(deltas[keep], anchors[keep])
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            rows, classes = torch.where(scores[keep] > self.score_thresh)
            box, score, label = boxes[rows], scores[keep][rows, classes], classes + 1
            final = box_ops.batched_nms(box, score, label, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": box[final], "scores": score[final], "labels": label[final]})
        return detections

    def _candidates(self, best: Tensor) -> Tensor:
        """Indices of the `nms_pre` highest of `best` (A,) within each feature level."""
        if sum(self.anchors_per_level) != best.numel():
            raise RuntimeError(f"{best.numel()} default boxes, expected {self.anchors_per_level} per level")
        assert self.nms_pre is not None
        out, start = [], 0
        for level in best.split(list(self.anchors_per_level)):
            out.append(level.topk(min(self.nms_pre, level.numel())).indices + start)
            start += level.numel()
        return torch.cat(out)


def fixed_input_size(cfg: ModelConfig) -> int | None:
    """The square side every input is resized to: SSD's nominal 300/512 px, or `cfg.min_size`
    when that is smaller; None for detectors that keep the aspect ratio. The loader resizes to
    it (`pisa.data.build_dataset`), so no larger image travels to the device."""
    return _input_side(cfg) if cfg.detector in SSD_SPECS else None


def _input_side(cfg: ModelConfig) -> int:
    return min(SSD_SPECS[cfg.detector]["size"], cfg.min_size)


def build_ssd(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """SSD300 or SSD512 (cfg.detector) for `num_classes` foreground classes.

    The input is the nominal 300/512 px square, or `cfg.min_size` when that is smaller
    (quick experiments and tests); default boxes then tile the actual feature maps.
    """
    if cfg.detector not in SSD_SPECS:
        raise ValueError(f"build_ssd needs detector ssd300 or ssd512, got {cfg.detector!r}")
    spec = SSD_SPECS[cfg.detector]
    size = _input_side(cfg)
    sizes = ssd_feature_sizes(cfg.detector, size)
    if min(sizes) < 1:
        raise ValueError(f"{cfg.detector} input {size}px is too small: feature maps would be {sizes}")
    nominal = size == spec["size"]
    anchor_generator = DefaultBoxGenerator(
        spec["aspect_ratios"], scales=spec["scales"], steps=spec["steps"] if nominal else None
    )
    backbone = build_vgg_backbone(cfg)
    head = PISASSDHead(
        _OUT_CHANNELS[cfg.detector],
        anchor_generator.num_anchors_per_location(),
        num_classes + 1,
        cfg,
    )
    model = PISASSD(
        backbone,
        anchor_generator,
        (size, size),
        num_classes + 1,
        image_mean=_IMAGE_MEAN,
        image_std=_IMAGE_STD,
        head=head,
        score_thresh=cfg.score_thresh,
        detections_per_img=cfg.detections_per_img,
    )
    model.nms_pre = cfg.nms_pre
    model.anchors_per_level = tuple(
        side * side * n for side, n in zip(sizes, anchor_generator.num_anchors_per_location())
    )
    # uint8 inputs, and no resize of an input the loader already brought to the fixed size
    model.transform = PisaTransform.from_torchvision(model.transform)
    return model
