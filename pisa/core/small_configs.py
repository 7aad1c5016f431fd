"""Model configs small enough to train on a CPU in seconds: the tests' tiny trainings and the
benchmarks' built-in study, layout and chaos runs start from them (on `pisa.data.synthetic`'s
shapes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A from-scratch Faster R-CNN for CPU studies at 96 px: MobileNetV3-FPN, few proposals and RoIs,
# a 64-channel FPN and a 128-wide box head. With torchvision's 256 channels and 1024-wide head,
# the head's first layer (256 x 7 x 7 -> 1024) held 13 of the 18 million parameters: a 145 MB
# checkpoint per epoch and 318 ms per 2-image step on one thread; here 1.9 million, 15 MB and
# 81 ms (benchmarks/RESULTS.md, "The suite's CPU by process").
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
    "box_head_width": 128,
    "fpn_channels": 64,
    "sampler": "random",
}


def tiny_experiment(data_dir: Path, work: Path, **train: Any) -> dict[str, Any]:
    """A training config small enough for a 2-worker CPU run in well under a minute: the small
    Faster R-CNN with ISR-P and CARL on the synthetic shapes in `data_dir` (8 training and 4
    validation images), tracked in `work`'s SQLite store; `train` overrides `train.*`."""
    return {
        "name": "tiny",
        "model": {**SMALL_FASTER_RCNN, "isr_p": {"enabled": True}, "carl": {"enabled": True}},
        "data": {
            "train_images": str(data_dir / "train"),
            "train_annotations": str(data_dir / "train.json"),
            "val_images": str(data_dir / "val"),
            "val_annotations": str(data_dir / "val.json"),
            "train_limit": 8,
            "val_limit": 4,
        },
        "train": {
            "schedule": "custom",
            "epochs": 2,
            "lr": 0.02,
            "base_batch": 16,
            "milestones": [],
            "warmup_iters": 2,
            "workers": 2,
            "use_gpu": False,
            "images_per_worker": 2,
            "log_every": 1,
            "seed": 0,
            **train,
        },
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "tests"},
        "storage_path": str(work / "ray_results"),
    }
