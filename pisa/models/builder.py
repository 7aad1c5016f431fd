"""`build_detector`: a `ModelConfig` in, a torchvision detector with PISA heads out.

`num_classes` counts foreground classes everywhere in `pisa`; torchvision's two-stage
models count the background too, so they get `num_classes + 1`.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads

from pisa.core.model_config import TORCHVISION_BOX_HEAD_WIDTH, ModelConfig, RoIAlignConfig
from pisa.models.backbones import build_backbone
from pisa.models.fixed_size import PisaRPN, PisaTransform
from pisa.models.pisa_loss import DiagnosticsMixin, box_loss_fn, collect_diagnostics
from pisa.models.retinanet import build_retinanet
from pisa.models.roi_align import AlignedMultiScaleRoIAlign
from pisa.models.roi_heads import PisaRoIHeads
from pisa.models.ssd import build_ssd, fixed_input_size

__all__ = [
    "build_detector",
    "collect_diagnostics",
    "DiagnosticsMixin",
    "fixed_input_size",
    "PisaFasterRCNN",
    "PisaMaskRCNN",
]


class PisaFasterRCNN(DiagnosticsMixin, FasterRCNN):
    """Faster R-CNN whose RoI heads train with a PISA sampler and losses."""


class PisaMaskRCNN(DiagnosticsMixin, MaskRCNN):
    """Mask R-CNN whose RoI heads train with a PISA sampler and losses."""


def _two_stage(cls: type[FasterRCNN], cfg: ModelConfig, num_classes: int) -> FasterRCNN:
    model = cls(
        build_backbone(cfg),
        num_classes=num_classes + 1,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=cfg.rois_per_image,
        box_positive_fraction=cfg.pos_fraction,
        box_score_thresh=cfg.score_thresh,
        box_detections_per_img=cfg.detections_per_img,
    )
    if cfg.box_head_width != TORCHVISION_BOX_HEAD_WIDTH:
        # the same two FC layers, narrower; the default keeps torchvision's own modules, so a
        # seed gives the same initial weights as it always did
        resolution = model.roi_heads.box_roi_pool.output_size[0]
        pooled = model.backbone.out_channels * resolution**2
        model.roi_heads.box_head = TwoMLPHead(pooled, cfg.box_head_width)
        model.roi_heads.box_predictor = FastRCNNPredictor(cfg.box_head_width, num_classes + 1)
    if cfg.roi_align is not None:
        _set_roi_align(model.roi_heads, cfg.roi_align)
    model.roi_heads = PisaRoIHeads.from_torchvision(model.roi_heads, cfg)
    # the same RPN and transform, selecting with fixed-size ops in training (no host syncs)
    rpn_box_loss = box_loss_fn(cfg.rpn_box_loss, cfg.rpn_box_loss) if cfg.rpn_box_loss else None
    model.rpn = PisaRPN.from_torchvision(model.rpn, rpn_box_loss)
    model.transform = PisaTransform.from_torchvision(model.transform)
    return model


def _set_roi_align(heads: RoIHeads, cfg: RoIAlignConfig) -> None:
    """The box (and mask) RoI pooling with the configured sampling, levels and sizes kept."""
    heads.box_roi_pool = AlignedMultiScaleRoIAlign.like(heads.box_roi_pool, cfg.sampling_ratio, cfg.aligned)
    if heads.mask_roi_pool is not None:
        heads.mask_roi_pool = AlignedMultiScaleRoIAlign.like(heads.mask_roi_pool, cfg.sampling_ratio, cfg.aligned)


def build_detector(cfg: ModelConfig, num_classes: int | None = None) -> nn.Module:
    """The configured detector; `num_classes` (foreground) overrides `cfg.num_classes`."""
    num_classes = num_classes if num_classes is not None else cfg.num_classes
    if num_classes is None:
        raise ValueError("num_classes is not set: give it in model.num_classes or take it from the dataset")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    match cfg.detector:
        case "faster_rcnn":
            return _two_stage(PisaFasterRCNN, cfg, num_classes)
        case "mask_rcnn":
            return _two_stage(PisaMaskRCNN, cfg, num_classes)
        case "retinanet":
            return build_retinanet(cfg, num_classes)
        case "ssd300" | "ssd512":
            return build_ssd(cfg, num_classes)
        case other:
            raise ValueError(f"unknown detector {other!r}")
