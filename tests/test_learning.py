"""Detectors really learn: short CPU trainings through Ray Train reach a clearly non-zero AP.

(a) the quickstart trial config (`configs/quickstart_trial.yaml`: from-scratch Faster
    R-CNN with ISR-P + ISR-N + CARL) on the synthetic shapes set;
(b) a small Faster R-CNN with PISA on real microscope photos (BCCD).

The thresholds are about half of the AP measured on a 2-core CPU, so they catch a model
that does not learn (AP ~0) without flaking on run-to-run noise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO

from pisa.core.config import ExperimentConfig, apply_overrides, load_yaml, parse_config
from pisa.training.train import TrainOutcome, run_training

pytestmark = pytest.mark.slow

QUICKSTART = REPO / "configs" / "quickstart_trial.yaml"

# measured on 2 cores (2026-11-26, seed 0, the config's 128-channel FPN): bbox_mAP 0.006 / 0.030 /
# 0.112 / 0.195 after epochs 1-4 (seeds 1 and 2: 0.161 and 0.154); deterministic; epochs of
# 13-18 s beside another training
SYNTHETIC_MIN_MAP = 0.10
# measured on 2 cores (AMD EPYC, 2026-12-02, beside another training): at 160x213, bbox_mAP
# 0.022 after epoch 1 (PISA from scratch is slow to start), 0.156 after epoch 2, 149 s in
# all; at the earlier 224x299, 0.0001 / 0.090 in 210 s (0.115 on an Intel Xeon). The
# blood cells stay 25-60 px at 160: the smaller input learns as well, 30% sooner. The
# paper's 1024-wide head reached 0.160 after epoch 2 at 224 (~125 s per epoch, under load):
# the learning check does not need it.
BCCD_MIN_MAP = 0.06


def _tracking(work: Path, experiment: str) -> list[str]:
    return [
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"tracking.experiment={experiment}",
        "tracking.log_checkpoint=false",
        f"storage_path={work / 'ray_results'}",
    ]


def bccd_experiment(bccd: Path, work: Path) -> dict:
    """Faster R-CNN (ResNet-18-FPN from scratch, trainable BN, a 256-wide box head) with PISA:
    two epochs of 64 BCCD train images at 160x213 (64 steps), evaluated on the first 24 val
    images."""
    return {
        "name": "bccd-learning",
        "model": {
            "detector": "faster_rcnn",
            "backbone": "resnet18_fpn",
            "norm": "bn",
            "min_size": 160,
            "max_size": 213,
            "rpn_pre_nms_top_n_train": 600,
            "rpn_post_nms_top_n_train": 300,
            "rpn_pre_nms_top_n_test": 300,
            "rpn_post_nms_top_n_test": 300,
            "rois_per_image": 128,
            "box_head_width": 256,
            "sampler": "score_hlr",
            "isr_p": {"enabled": True},
            "carl": {"enabled": True},
        },
        "data": {
            "train_images": str(bccd / "images"),
            "train_annotations": str(bccd / "train.json"),
            "val_images": str(bccd / "images"),
            "val_annotations": str(bccd / "val.json"),
            "train_limit": 64,
            "val_limit": 24,
        },
        "train": {
            "schedule": "custom",
            "epochs": 2,
            "lr": 0.01,
            "base_batch": 2,
            "milestones": [],
            "warmup_iters": 30,
            "grad_clip": 5.0,
            "workers": 1,
            "use_gpu": False,
            "images_per_worker": 2,
            "log_every": 20,
            "seed": 0,
        },
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "learning", "log_checkpoint": False},
        "storage_path": str(work / "ray_results"),
    }


def quickstart_experiment(work: Path) -> ExperimentConfig:
    data = apply_overrides(
        load_yaml(QUICKSTART),
        [f"data.synthetic.out={work / 'quickstart'}", *_tracking(work, "learning")],
    )
    return parse_config(data, source=str(QUICKSTART))


@pytest.fixture(scope="module")
def learned(ray_local, bccd_dir, tmp_path_factory) -> dict[str, tuple[ExperimentConfig, TrainOutcome]]:
    """Both trainings at once, each a `pisa train` of one single-threaded worker: side by
    side on the 2-core CI machine they take about as long as the longer one alone."""
    configs = {
        "synthetic": quickstart_experiment(tmp_path_factory.mktemp("quickstart")),
        "bccd": parse_config(bccd_experiment(bccd_dir, tmp_path_factory.mktemp("bccd"))),
    }

    @ray_local.remote(num_cpus=0)  # the trainings' workers take the CPUs
    def train(cfg: ExperimentConfig, run_name: str) -> TrainOutcome:
        return run_training(cfg, run_name=run_name)

    pending = {key: train.remote(cfg, f"learning-{key}") for key, cfg in configs.items()}
    return {key: (configs[key], ray_local.get(ref)) for key, ref in pending.items()}


def test_quickstart_trial_learns_synthetic_shapes(learned):
    cfg, outcome = learned["synthetic"]
    assert cfg.train.workers == 1 and not cfg.train.use_gpu
    assert cfg.model.isr_p.enabled and cfg.model.carl.enabled and cfg.model.isr_n_enabled
    assert outcome.status == "FINISHED", outcome.error
    assert outcome.metrics["epoch"] == cfg.train.epochs
    assert outcome.metrics["bbox_mAP"] > SYNTHETIC_MIN_MAP, outcome.metrics


def test_small_detector_learns_real_bccd_images(learned):
    _, outcome = learned["bccd"]
    assert outcome.status == "FINISHED", outcome.error
    assert outcome.metrics["bbox_mAP"] > BCCD_MIN_MAP, outcome.metrics
