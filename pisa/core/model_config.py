"""The model section of a training config: the detector, its backbone and PISA's parts
(ISR-P, ISR-N, CARL), the RoI sampler and the test settings, with the paper's defaults, and
which detector kinds each setting applies to. `pisa.core.config` assembles the sections."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo in a YAML file must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PowerK = Annotated[float, Field(gt=0, description="power of the non-linear mapping, > 0")]
Bias = Annotated[float, Field(ge=0, lt=1, description="shift of the non-linear mapping, in [0, 1)")]

Detector = Literal["faster_rcnn", "mask_rcnn", "retinanet", "ssd300", "ssd512"]
Backbone = Literal["resnet50_fpn", "resnext101_32x4d_fpn", "resnet18_fpn", "mobilenet_v3_fpn", "vgg16"]
SamplerName = Literal["random", "ohem", "ohem_1to3", "score_hlr"]


class ISRPConfig(StrictModel):
    """ISR-P: IoU-HLR reweighting of positives (paper default k=2, b=0)."""

    enabled: bool = False
    k: PowerK = 2.0
    bias: Bias = 0.0


class ISRNConfig(StrictModel):
    """ISR-N: Score-HLR sampling of negatives; used when `sampler: score_hlr` (k=0.5, b=0)."""

    k: PowerK = 0.5
    bias: Bias = 0.0
    score_thr: float = Field(0.05, ge=0, lt=1)
    iou_thr: float = Field(0.5, gt=0, le=1)


class CARLConfig(StrictModel):
    """CARL: classification-aware regression loss (paper default k=1, b=0.2)."""

    enabled: bool = False
    k: PowerK = 1.0
    bias: Bias = 0.2


class BoxLossConfig(StrictModel):
    """Box regression loss (and the loss CARL weights). Unset in `model.box_loss`: the
    detector's torchvision loss (two-stage smooth-L1 beta 1/9, RetinaNet L1, SSD smooth-L1 beta 1)."""

    type: Literal["smooth_l1", "l1"] = "smooth_l1"
    beta: float = Field(1.0, gt=0, description="smooth-L1 transition point (unused by l1)")


class RoIAlignConfig(StrictModel):
    """Two-stage RoIAlign sampling. Unset in `model.roi_align`: torchvision's (2 samples per
    bin, aligned=False, mmdetection 1.x's); mmdetection 2.x's base configs use 0 (adaptive) and
    aligned=True (half-pixel shift, no 1-pixel minimum RoI size)."""

    sampling_ratio: int = Field(0, ge=0, description="samples per bin side; 0 = adaptive (ceil(roi/bin))")
    aligned: bool = True


TORCHVISION_BOX_HEAD_WIDTH = 1024  # the box head FasterRCNN builds when given none (the paper's)
TORCHVISION_FPN_CHANNELS = 256  # torchvision's FPN width (mmdetection's FPN out_channels, the paper's)


class ModelConfig(StrictModel):
    """Which detector, which backbone, which PISA parts."""

    detector: Detector = "faster_rcnn"
    backbone: Backbone = "resnet50_fpn"
    num_classes: int | None = Field(None, ge=1, description="foreground classes; None = taken from the dataset")
    pretrained_backbone: str | None = Field(
        None,
        description="torchvision weights enum (e.g. 'ResNet50_Weights.IMAGENET1K_V1') or a local .pth file",
    )
    norm: Literal["auto", "frozen_bn", "bn", "gn"] = Field(
        "auto", description="auto: frozen BN with pretrained weights, trainable BN from scratch"
    )
    frozen_bn_affine: bool = Field(
        False,
        description="frozen BN's scale and shift train in the trainable stages (mmdetection's BN with "
        "norm_eval=True: statistics frozen, affine trained); false: torchvision's FrozenBatchNorm2d, "
        "both frozen",
    )
    trainable_backbone_layers: int = Field(3, ge=0, le=5)
    min_size: int = Field(800, ge=32)
    max_size: int = Field(1333, ge=32)
    # two-stage
    rpn_pre_nms_top_n_train: int = Field(2000, ge=1)
    rpn_post_nms_top_n_train: int = Field(2000, ge=1, description="proposals per image for training")
    rpn_pre_nms_top_n_test: int = Field(1000, ge=1)
    rpn_post_nms_top_n_test: int = Field(1000, ge=1)
    rpn_batch_size_per_image: int = Field(256, ge=1)
    rois_per_image: int = Field(512, ge=1, description="RoIs sampled per image")
    pos_fraction: float = Field(0.25, gt=0, le=1)
    sampler: SamplerName = "random"
    # PISA
    isr_p: ISRPConfig = ISRPConfig()
    isr_n: ISRNConfig = ISRNConfig()
    carl: CARLConfig = CARLConfig()
    box_loss: BoxLossConfig | None = Field(
        None, description="box regression loss; None keeps the detector's torchvision loss"
    )
    rpn_box_loss: BoxLossConfig | None = Field(
        None,
        description="two-stage: the RPN's box loss; None keeps torchvision's smooth-L1 beta 1/9 "
        "(mmdetection 1.x's; 2.x's base configs use L1)",
    )
    roi_align: RoIAlignConfig | None = Field(
        None, description="two-stage: RoIAlign sampling of the box and mask heads; None keeps torchvision's"
    )
    box_head_width: int = Field(
        TORCHVISION_BOX_HEAD_WIDTH,
        ge=16,
        description="two-stage: width of the box head's two fully connected layers (mmdetection's "
        "fc_out_channels; 1024 in the paper); narrower is cheaper for small CPU studies",
    )
    fpn_channels: int = Field(
        TORCHVISION_FPN_CHANNELS,
        ge=32,
        multiple_of=32,  # GroupNorm's 32 groups (norm: gn, RetinaNet's head)
        description="FPN detectors: channels of every pyramid level, and so of the RPN head and the "
        "pooled RoI features (mmdetection's FPN out_channels; 256 in the paper); 128 halves a small "
        "CPU detector's step",
    )
    # inference
    score_thresh: float = Field(0.05, ge=0, lt=1)
    detections_per_img: int = Field(100, ge=1)
    nms_pre: int | None = Field(
        None,
        ge=1,
        description="SSD test: per feature level, the anchors with the highest foreground score kept "
        "before NMS (mmdetection's nms_pre); None keeps torchvision's 400 candidates per class",
    )
    diagnostics: bool = Field(True, description="keep the last step's ISR-P/CARL weights for logging")

    @property
    def two_stage(self) -> bool:
        """An RPN and RoI heads (Faster/Mask R-CNN): RoI sampling, ISR-N, RoIAlign apply."""
        return self.detector in ("faster_rcnn", "mask_rcnn")

    @property
    def fixed_size(self) -> bool:
        """SSD: every image is resized to one square input, so a batch has one shape."""
        return self.detector in ("ssd300", "ssd512")

    @property
    def has_masks(self) -> bool:
        """Mask R-CNN: trains on masks and is evaluated on segm too."""
        return self.detector == "mask_rcnn"

    @model_validator(mode="after")
    def _check_combinations(self) -> ModelConfig:
        two_stage = self.two_stage
        if not two_stage and self.sampler != "random":
            raise ValueError(
                f"sampler '{self.sampler}' needs a two-stage detector (faster_rcnn, mask_rcnn); "
                f"'{self.detector}' samples no RoIs (the paper uses no ISR-N for single-stage models)"
            )
        if not two_stage and self.box_head_width != TORCHVISION_BOX_HEAD_WIDTH:
            raise ValueError(f"box_head_width is for two-stage detectors; '{self.detector}' has no box head")
        if self.fixed_size and self.fpn_channels != TORCHVISION_FPN_CHANNELS:
            raise ValueError(f"fpn_channels is for FPN backbones; '{self.detector}' uses VGG16 without an FPN")
        if self.fixed_size and self.backbone != "vgg16":
            raise ValueError(f"detector '{self.detector}' needs backbone 'vgg16'")
        if self.backbone == "vgg16" and not self.fixed_size:
            raise ValueError("backbone 'vgg16' is only for ssd300/ssd512")
        if self.max_size < self.min_size:
            raise ValueError("max_size must be >= min_size")
        if not two_stage and (self.rpn_box_loss is not None or self.roi_align is not None):
            raise ValueError(f"rpn_box_loss and roi_align are for two-stage detectors; '{self.detector}' has neither")
        if self.nms_pre is not None and not self.fixed_size:
            raise ValueError(f"nms_pre is for ssd300/ssd512; '{self.detector}' keeps torchvision's candidates")
        return self

    @property
    def isr_n_enabled(self) -> bool:
        return self.sampler == "score_hlr"
