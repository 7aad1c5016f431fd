"""The shipped training configs (configs/) and study files (studies/) load and say what they claim.

Fast: nothing trains, nothing is downloaded, no dataset is read.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pisa.core.config import ExperimentConfig, load_config
from pisa.search.schema import PAPER_DEFAULTS
from pisa.search.study import load_study

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
STUDIES = sorted((REPO / "studies").glob("*.yaml"))

COCO_CONFIGS = [
    "faster_rcnn_r50_fpn_1x_random.yaml",
    "faster_rcnn_r50_fpn_1x_ohem.yaml",
    "faster_rcnn_r50_fpn_1x_ohem_1to3.yaml",
    "faster_rcnn_r50_fpn_1x_pisa.yaml",
    "faster_rcnn_x101_32x4d_fpn_1x_random.yaml",
    "faster_rcnn_x101_32x4d_fpn_1x_pisa.yaml",
    "mask_rcnn_r50_fpn_1x_random.yaml",
    "mask_rcnn_r50_fpn_1x_pisa.yaml",
    "mask_rcnn_x101_32x4d_fpn_1x_random.yaml",
    "mask_rcnn_x101_32x4d_fpn_1x_pisa.yaml",
    "retinanet_r50_fpn_1x_baseline.yaml",
    "retinanet_r50_fpn_1x_pisa.yaml",
    "retinanet_x101_32x4d_fpn_1x_baseline.yaml",
    "retinanet_x101_32x4d_fpn_1x_pisa.yaml",
    "ssd300_baseline.yaml",
    "ssd300_pisa.yaml",
    "ssd512_baseline.yaml",
    "ssd512_pisa.yaml",
]
SSD_CONFIGS = ["ssd300_baseline.yaml", "ssd300_pisa.yaml", "ssd512_baseline.yaml", "ssd512_pisa.yaml"]
# every PISA config, its baseline, and the paper's box APs (baseline, PISA; None: not published)
PAIRS: dict[str, tuple[str, str, str | None]] = {
    "faster_rcnn_r50_fpn_1x_pisa.yaml": ("faster_rcnn_r50_fpn_1x_random.yaml", "36.4", "38.4"),
    "faster_rcnn_x101_32x4d_fpn_1x_pisa.yaml": ("faster_rcnn_x101_32x4d_fpn_1x_random.yaml", "40.1", "41.9"),
    "mask_rcnn_r50_fpn_1x_pisa.yaml": ("mask_rcnn_r50_fpn_1x_random.yaml", "37.3", "39.1"),
    "mask_rcnn_x101_32x4d_fpn_1x_pisa.yaml": ("mask_rcnn_x101_32x4d_fpn_1x_random.yaml", "41.1", None),
    "retinanet_r50_fpn_1x_pisa.yaml": ("retinanet_r50_fpn_1x_baseline.yaml", "35.6", "36.9"),
    "retinanet_x101_32x4d_fpn_1x_pisa.yaml": ("retinanet_x101_32x4d_fpn_1x_baseline.yaml", "39.0", "40.7"),
    "ssd300_pisa.yaml": ("ssd300_baseline.yaml", "25.6", "27.6"),
    "ssd512_pisa.yaml": ("ssd512_baseline.yaml", "29.3", "31.8"),
}
PISA_CONFIGS = sorted(PAIRS)
SHIPPED_STUDIES = [
    "faster_rcnn_r50_coco.yaml",
    "retinanet_r50_coco.yaml",
    "ssd300_coco.yaml",
    "bccd_cpu.yaml",
]


def cfg(name: str) -> ExperimentConfig:
    return load_config(REPO / "configs" / name)


# ---------------------------------------------------------------- training configs


def test_expected_files_are_shipped():
    names = {p.name for p in CONFIGS}
    assert set(COCO_CONFIGS) | {"bccd_cpu.yaml"} <= names
    assert set(SHIPPED_STUDIES) <= {p.name for p in STUDIES}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path: Path):
    config = load_config(path)
    # a paper set-up's file is named after its detector
    assert path.name.startswith((config.model.detector, "bccd_", "cpu_", "quickstart_")), config.model.detector
    # every config starts with a comment naming its setup
    assert path.read_text().startswith("# ")


def test_faster_rcnn_pisa_has_the_paper_settings():
    m = cfg("faster_rcnn_r50_fpn_1x_pisa.yaml").model
    assert m.detector == "faster_rcnn" and m.backbone == "resnet50_fpn"
    assert m.sampler == "score_hlr" and m.isr_n_enabled
    assert (m.isr_p.enabled, m.isr_p.k, m.isr_p.bias) == (True, 2.0, 0.0)
    assert (m.isr_n.k, m.isr_n.bias) == (0.5, 0.0)
    assert (m.carl.enabled, m.carl.k, m.carl.bias) == (True, 1.0, 0.2)
    assert m.rpn_post_nms_top_n_train == 2000
    assert m.rois_per_image == 512
    assert m.pos_fraction == 0.25
    assert m.pretrained_backbone == "ResNet50_Weights.IMAGENET1K_V1"
    assert m.norm == "frozen_bn"


def test_faster_rcnn_variants_differ_only_in_sampling_and_pisa():
    # and in test-time proposals: 2000 in the reference PISA configs, 1000 in its baselines
    pisa_parts = ("sampler", "isr_p", "isr_n", "carl", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test")
    pisa = cfg("faster_rcnn_r50_fpn_1x_pisa.yaml").model.model_dump(exclude=set(pisa_parts))
    expected = {
        "faster_rcnn_r50_fpn_1x_random.yaml": "random",
        "faster_rcnn_r50_fpn_1x_ohem.yaml": "ohem",
        "faster_rcnn_r50_fpn_1x_ohem_1to3.yaml": "ohem_1to3",
    }
    for name, sampler in expected.items():
        m = cfg(name).model
        assert m.sampler == sampler, name
        assert not m.isr_p.enabled and not m.carl.enabled, name
        assert m.model_dump(exclude=set(pisa_parts)) == pisa, name


def _header(name: str) -> str:
    text = (REPO / "configs" / name).read_text()
    return "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))


@pytest.mark.parametrize("name", PISA_CONFIGS)
def test_every_pisa_config_has_a_baseline_and_states_the_reference(name: str):
    baseline, base_ap, pisa_ap = PAIRS[name]
    for file, ap in ((name, pisa_ap), (baseline, base_ap)):
        header = _header(file)
        assert "Reference set-up:" in header, file
        if ap is None:
            assert "Paper AP: not published" in header, file
            continue
        assert f"Paper box AP: {ap}" in header or f"Paper AP: box {ap}" in header, file
    pisa, base = cfg(name).model, cfg(baseline).model
    assert not base.isr_p.enabled and not base.carl.enabled and base.sampler == "random"
    assert pisa.isr_p.enabled and pisa.carl.enabled
    differ = {"sampler", "isr_p", "isr_n", "carl", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test"}
    assert pisa.model_dump(exclude=differ) == base.model_dump(exclude=differ)
    assert cfg(name).data == cfg(baseline).data


def test_box_losses_and_test_proposals_follow_the_reference():
    for name in PISA_CONFIGS:
        m = cfg(name).model
        if m.detector in ("faster_rcnn", "mask_rcnn"):
            assert (m.box_loss.type, m.box_loss.beta) == ("smooth_l1", 1.0), name
            assert m.rpn_pre_nms_top_n_test == m.rpn_post_nms_top_n_test == 2000, name
        elif m.detector == "retinanet":
            assert (m.box_loss.type, m.box_loss.beta) == ("smooth_l1", 0.11), name
        else:  # SSD: torchvision's smooth-L1 beta 1 is the reference's
            assert m.box_loss is None, name
            assert m.trainable_backbone_layers == 5, name
            assert cfg(name).data.augment == "ssd", name


def test_single_stage_pisa_configs_use_no_isr_n():
    for name in (
        "retinanet_r50_fpn_1x_pisa.yaml",
        "retinanet_x101_32x4d_fpn_1x_pisa.yaml",
        "ssd300_pisa.yaml",
        "ssd512_pisa.yaml",
    ):
        m = cfg(name).model
        assert m.sampler == "random" and not m.isr_n_enabled, name
        assert (m.isr_p.enabled, m.isr_p.k, m.isr_p.bias) == (True, 2.0, 0.0), name
        assert (m.carl.enabled, m.carl.k, m.carl.bias) == (True, 1.0, 0.2), name
    for name in ("retinanet_r50_fpn_1x_baseline.yaml", "ssd300_baseline.yaml"):
        m = cfg(name).model
        assert not m.isr_p.enabled and not m.carl.enabled, name


@pytest.mark.parametrize("name", sorted(set(COCO_CONFIGS) - set(SSD_CONFIGS)))
def test_1x_configs_use_the_paper_schedule(name: str):
    c = cfg(name)
    s = c.train.resolved()
    assert c.train.schedule == "1x"
    assert s.epochs == 12 and s.milestones == (8, 11)
    assert s.total_batch == 16 and c.train.images_per_worker == 2
    # mmdetection's: 0.02, RetinaNet 0.01 (retinanet_r50_fpn_1x_coco.py); fp32
    assert s.scaled_lr == pytest.approx(0.01 if c.model.detector == "retinanet" else 0.02)
    assert c.train.workers == 8 and c.train.use_gpu and not c.train.amp


@pytest.mark.parametrize("name", SSD_CONFIGS)
def test_ssd_configs_use_the_ssd_schedule(name: str):
    c = cfg(name)
    s = c.train.resolved()
    assert c.train.schedule == "ssd"
    assert s.epochs == 120 and s.milestones == (80, 110)
    assert s.total_batch == 64 and c.train.images_per_worker == 8
    assert s.scaled_lr == pytest.approx(2e-3)  # mmdetection's configs/ssd (the supplement: 1e-3)
    assert c.model.backbone == "vgg16"
    assert c.model.pretrained_backbone == "VGG16_Weights.IMAGENET1K_FEATURES"
    size = 300 if "ssd300" in name else 512
    assert c.model.min_size == c.model.max_size == size


@pytest.mark.parametrize("name", COCO_CONFIGS)
def test_coco_configs_point_at_coco_2017(name: str, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the working directory
    d = cfg(name).data
    assert d.train_images == tmp_path / "data/coco/train2017"
    assert d.train_annotations == tmp_path / "data/coco/annotations/instances_train2017.json"
    assert d.val_images == tmp_path / "data/coco/val2017"
    assert d.val_annotations == tmp_path / "data/coco/annotations/instances_val2017.json"


def test_x101_config_reads_a_local_backbone_file(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    m = cfg("faster_rcnn_x101_32x4d_fpn_1x_pisa.yaml").model
    assert m.backbone == "resnext101_32x4d_fpn"
    assert m.pretrained_backbone == str(tmp_path / "weights" / "resnext101_32x4d.pth")


def test_bccd_cpu_config():
    c = cfg("bccd_cpu.yaml")
    m, d, t = c.model, c.data, c.train
    assert (m.detector, m.backbone, m.norm) == ("faster_rcnn", "mobilenet_v3_fpn", "bn")
    assert (m.min_size, m.max_size) == (256, 342)
    assert m.rpn_post_nms_top_n_train == 300 and m.rois_per_image == 128
    assert m.sampler == "random" and not m.isr_p.enabled and not m.carl.enabled
    assert m.pretrained_backbone is None  # nothing to download
    assert t.workers == 1 and not t.use_gpu and t.schedule == "custom"
    s = t.resolved()
    assert s.epochs == 4 and s.warmup_iters < 292 // t.images_per_worker
    assert d.val_limit == 40
    assert d.train_images == (Path.cwd() / "datasets/bccd/images").resolve()
    assert d.val_annotations.name == "val.json" and d.train_annotations.name == "train.json"


# ---------------------------------------------------------------- studies


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_study_loads_without_touching_data(path: Path, monkeypatch, tmp_path):
    # from an empty working directory every relative data path points at nothing
    monkeypatch.chdir(tmp_path)
    study = load_study(path)
    assert list(tmp_path.iterdir()) == [], "loading a study must not write anything"
    points = study.initial_points()
    assert any(
        all(value == PAPER_DEFAULTS[key] for key, value in point.items() if key in PAPER_DEFAULTS) for point in points
    ), f"{path.name}: the paper's defaults are not among the initial points {points}"
    # every initial point gives a valid training config
    for point in points:
        study.experiment(point)


def test_study_data_paths_can_be_overridden(tmp_path):
    study = load_study(
        REPO / "studies" / "bccd_cpu.yaml",
        [f"data.train_images={tmp_path}/img", f"data.val_annotations={tmp_path}/v.json"],
    )
    assert study.base["data"]["train_images"] == str(tmp_path / "img")
    assert study.base["data"]["val_annotations"] == str(tmp_path / "v.json")


def test_faster_rcnn_study_starts_from_the_paper_defaults():
    study = load_study(REPO / "studies" / "faster_rcnn_r50_coco.yaml")
    c = study.cfg
    assert c.num_samples == 24 and c.max_concurrent_trials == 1
    assert (c.resources_per_trial.workers, c.resources_per_trial.gpus_per_worker) == (8, 1)
    assert (c.scheduler.type, c.scheduler.grace_period, c.scheduler.reduction_factor) == ("asha", 4, 2)
    assert c.search_space["model.isr_n.k"].type == "loguniform"
    first = study.initial_points()[0]
    assert first == {
        "model.isr_p.k": 2.0,
        "model.isr_p.bias": 0.0,
        "model.isr_n.k": 0.5,
        "model.isr_n.bias": 0.0,
        "model.carl.k": 1.0,
        "model.carl.bias": 0.2,
    }
    trial = study.experiment(first).model
    assert trial.sampler == "score_hlr" and trial.isr_p.enabled and trial.carl.enabled


def test_single_stage_studies_search_no_isr_n():
    for name in ("retinanet_r50_coco.yaml", "ssd300_coco.yaml"):
        study = load_study(REPO / "studies" / name)
        assert not any(k.startswith("model.isr_n") or k == "model.sampler" for k in study.cfg.search_space)
        assert study.initial_points()[0] == {
            "model.isr_p.k": 2.0,
            "model.isr_p.bias": 0.0,
            "model.carl.k": 1.0,
            "model.carl.bias": 0.2,
        }
    ssd = load_study(REPO / "studies" / "ssd300_coco.yaml")
    assert ssd.cfg.resources_per_trial.workers * ssd.cfg.resources_per_trial.gpus_per_worker == 8
    assert ssd.base["train"]["images_per_worker"] == 8


def test_bccd_study_compares_pisa_with_the_baseline():
    study = load_study(REPO / "studies" / "bccd_cpu.yaml")
    c = study.cfg
    assert c.num_samples <= 8 and c.max_concurrent_trials == 2
    assert (c.resources_per_trial.workers, c.resources_per_trial.gpus_per_worker) == (1, 0)
    assert study.base["train"]["use_gpu"] is False
    paper, baseline = study.initial_points()[:2]
    pisa_trial = study.experiment(paper).model
    assert pisa_trial.sampler == "score_hlr" and pisa_trial.isr_p.enabled and pisa_trial.carl.enabled
    assert (pisa_trial.isr_p.k, pisa_trial.carl.bias) == (2.0, 0.2)
    base_trial = study.experiment(baseline).model
    assert base_trial.sampler == "random"
    assert not base_trial.isr_p.enabled and not base_trial.carl.enabled


# ---------------------------------------------------------------- model construction


@pytest.mark.parametrize(
    "name, classes",
    [("faster_rcnn_x101_32x4d_fpn_1x_pisa.yaml", 80), ("ssd300_pisa.yaml", 80)],
)
def test_large_configs_build_without_weights(name: str, classes: int):
    from pisa.models import build_detector

    c = load_config(REPO / "configs" / name, ["model.pretrained_backbone=null"])
    model = build_detector(c.model, num_classes=classes)
    assert sum(p.numel() for p in model.parameters()) > 10_000_000


BCCD_SEARCH = REPO / "benchmarks" / "studies" / "bccd_3ep_search.yaml"


def test_the_bccd_search_loads_with_the_command_in_its_header(monkeypatch):
    monkeypatch.chdir(REPO)  # its header's command runs from the repository root
    text = BCCD_SEARCH.read_text()
    header = " ".join(ln.lstrip("#").strip().rstrip("\\") for ln in text.splitlines() if ln.startswith("#"))
    overrides = [o.strip("'") for o in re.findall(r"--set ('[^']+'|\S+)", header)]
    study = load_study(BCCD_SEARCH, overrides)
    base = study.base_config
    # the budget of the 3-epoch BCCD comparison in benchmarks/RESULTS.md, PISA fully on
    assert base.train.epochs == 3 and base.train.milestones == [] and base.train.base_batch == 4
    assert base.train.warmup_iters == 100 and base.data.val_limit is None
    assert base.model.sampler == "score_hlr" and base.model.isr_p.enabled and base.model.carl.enabled
    assert study.initial_points() == []  # the baseline and paper defaults are measured already


def test_detector_kinds_are_properties_of_the_model_config():
    from pisa.core.config import ModelConfig

    kinds = {
        d: (m.two_stage, m.fixed_size, m.has_masks)
        for d in ("faster_rcnn", "mask_rcnn", "retinanet", "ssd300", "ssd512")
        for m in [ModelConfig(detector=d, backbone="vgg16" if d.startswith("ssd") else "resnet50_fpn")]
    }
    assert kinds == {
        "faster_rcnn": (True, False, False),
        "mask_rcnn": (True, False, True),
        "retinanet": (False, False, False),
        "ssd300": (False, True, False),
        "ssd512": (False, True, False),
    }
