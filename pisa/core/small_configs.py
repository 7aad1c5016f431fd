"""Model configs small enough to train on a CPU in seconds: the tests' tiny trainings and the
benchmarks' built-in study and layout runs start from them (on `pisa.data.synthetic`'s shapes)."""

from __future__ import annotations

from typing import Any

# A from-scratch Faster R-CNN for CPU studies at 96 px: MobileNetV3-FPN, few proposals and RoIs
SMALL_FASTER_RCNN: dict[str, Any] = {
    "detector": "faster_rcnn",
    "backbone": "mobilenet_v3_fpn",
    "norm": "bn",
    "min_size": 96,
    "max_size": 96,
    "rpn_pre_nms_top_n_train": 150,
    "rpn_post_nms_top_n_train": 150,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 100,
    "rois_per_image": 32,
    "sampler": "random",
}
