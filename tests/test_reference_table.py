"""Every paper config, built, against the transcribed reference (configs/reference/mmdetection_pisa.yaml).

The expectations come from the table, which was read off mmdetection's files, never from
configs/*.yaml: a config that drifts from the reference fails here with the setting, the
built value, the reference's and the mmdetection file it comes from. Models are built without
pretrained weights (the trunk loader is stubbed, so the configs' frozen stages still apply);
nothing is downloaded or trained.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from pisa.core.config import ExperimentConfig, load_config
from pisa.data import build_dataset
from pisa.models import backbones, build_detector, fixed_input_size
from pisa.models.backbones import AffineFrozenBatchNorm2d
from pisa.training.device_plan import plan_for
from pisa.training.engine import build_optimizer

REPO = Path(__file__).resolve().parents[1]
TABLE = yaml.safe_load((REPO / "configs" / "reference" / "mmdetection_pisa.yaml").read_text())
SETUPS: dict[str, dict[str, Any]] = TABLE["setups"]
CASES = [(row, kind) for row in SETUPS for kind in ("pisa", "baseline")]
NUM_CLASSES = 80


class Built:
    """A paper config and what it builds: the model, the schedule, the optimizer."""

    def __init__(self, cfg: ExperimentConfig, model: nn.Module):
        self.cfg = cfg
        self.model = model
        self.schedule = cfg.train.resolved()
        self.optimizer = build_optimizer(model, self.schedule)
        two_stage = cfg.model.detector in ("faster_rcnn", "mask_rcnn")
        self.heads = model.roi_heads if two_stage else model.head
        self.post = model.roi_heads if two_stage else model  # test-time settings
        self.trunk = model.backbone.body if hasattr(model.backbone, "body") else model.backbone


@cache
def built(name: str) -> Built:
    cfg = load_config(REPO / "configs" / name)
    spec = cfg.model.pretrained_backbone
    saved = backbones._pretrained_state, backbones.load_trunk_weights
    # no weights: the trunk loader is a no-op, so `trainable_backbone_layers` still freezes stages
    backbones._pretrained_state = lambda s: ({}, s)  # type: ignore[assignment]
    backbones.load_trunk_weights = lambda *a, **k: 0  # type: ignore[assignment]
    try:
        if cfg.model.backbone == "vgg16":  # SSD: every layer trains, weights or not
            cfg = load_config(REPO / "configs" / name, ["model.pretrained_backbone=null"])
        torch.manual_seed(0)
        model = build_detector(cfg.model, NUM_CLASSES)
    finally:
        backbones._pretrained_state, backbones.load_trunk_weights = saved
    assert spec, f"{name}: a paper config starts from pretrained weights"
    return Built(cfg, model)


def _pair(x: Any) -> list:
    return list(x) if isinstance(x, (tuple, list)) else [x, x]


def _loss_is(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], spec: list) -> bool:
    """Whether an element-wise box loss behaves as [type, beta] (or [l1])."""
    pred, target = torch.linspace(-2, 2, 40).reshape(10, 4), torch.zeros(10, 4)
    want = F.l1_loss(pred, target, reduction="none") if spec[0] == "l1" else None
    if want is None:
        want = F.smooth_l1_loss(pred, target, beta=spec[1], reduction="none")
    return torch.allclose(fn(pred, target).float(), want)


def _pisa_values(pisa_loss: Any, part: str) -> list | None:
    c = getattr(pisa_loss, part)
    return [c.k, c.bias] if c.enabled else None


def _trunk_stage_grads(b: Built) -> dict[str, bool]:
    stages = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
    return {s: any(p.requires_grad for n, p in b.trunk.named_parameters() if n.startswith(s + ".")) for s in stages}


def _norm(b: Built) -> str:
    norms = [m for m in b.trunk.modules() if "Norm" in type(m).__name__]
    if norms and all(type(m) is AffineFrozenBatchNorm2d for m in norms):
        stats_frozen = all(n in dict(m.named_buffers()) for m in norms for n in ("running_mean", "running_var"))
        trained = any(m.weight.requires_grad for m in norms)
        return "bn_norm_eval" if stats_frozen and trained else "frozen_affine_untrained"
    return ",".join(sorted({type(m).__name__ for m in norms}))


def _p7_has_no_relu(b: Built) -> bool:
    extra = b.model.backbone.fpn.extra_blocks
    c5 = torch.randn(1, extra.p6.in_channels, 8, 8)
    with torch.no_grad():
        out, _ = extra([torch.zeros(1)], [c5], ["p"])
        return torch.allclose(out[-1], extra.p7(extra.p6(c5)))


def _normaliser(b: Built, monkeypatch_dist: Callable[[], Any]) -> str:
    """`positives_per_gpu` when the loss ignores a process group that would average the count."""
    head = b.model.head
    anchors = [torch.tensor([[0.0, 0, 10, 10], [0, 0, 12, 12], [20, 20, 30, 30], [5, 5, 9, 9]])]
    n = anchors[0].shape[0]
    outputs = {"cls_logits": torch.randn(1, n, NUM_CLASSES + 1), "bbox_regression": torch.randn(1, n, 4)}
    targets = [{"boxes": torch.tensor([[0.0, 0, 11, 11]]), "labels": torch.tensor([3])}]
    matched = [torch.tensor([0, 0, -1, -2])]
    alone = head.compute_loss(targets, outputs, anchors, matched)
    with monkeypatch_dist():
        grouped = head.compute_loss(targets, outputs, anchors, matched)
    same = all(torch.allclose(alone[k], grouped[k]) for k in alone)
    return "positives_per_gpu" if same else "averaged_over_workers"


class _FakeGroup:
    """torch.distributed as it looks on worker 0 of 2 whose all_reduce triples the value."""

    def __enter__(self):
        import torch.distributed as dist

        self._saved = dist.is_initialized, dist.get_world_size, dist.all_reduce
        dist.is_initialized = lambda: True  # type: ignore[assignment]
        dist.get_world_size = lambda *a: 2  # type: ignore[assignment]
        dist.all_reduce = lambda t, *a, **k: t.mul_(3)  # type: ignore[assignment]

    def __exit__(self, *exc):
        import torch.distributed as dist

        dist.is_initialized, dist.get_world_size, dist.all_reduce = self._saved


def _data(b: Built, tmp: Path) -> dict[str, Any]:
    """The training pipeline the config builds, on two tiny images (one without annotations)."""
    images = tmp / "img"
    images.mkdir(exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i in (1, 2):
        Image.new("RGB", (64, 48)).save(images / f"{i}.png")
        coco["images"].append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 48})
    coco["annotations"].append({"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400})
    (tmp / "a.json").write_text(json.dumps(coco))
    data = b.cfg.data.model_copy(
        update={"train_images": images, "train_annotations": tmp / "a.json", "val_images": images}
    )
    ds = build_dataset(data, "train", train=True, fixed_size=fixed_input_size(b.cfg.model))
    t = ds.transforms
    return {"skip_empty_train": len(ds) == 1, "flip_ratio": t.flip_prob, "augment": t.augment}


def _image_scale(b: Built) -> list[int]:
    side = fixed_input_size(b.cfg.model)
    if side is not None:
        assert b.model.transform.fixed_size == (side, side)
        return [side, side]
    t = b.model.transform
    return [t.max_size, *t.min_size]


def _backbone(b: Built) -> str:
    if b.cfg.model.backbone == "vgg16":
        return "vgg16"
    blocks = len(b.trunk.layer3)
    groups = b.trunk.layer1[0].conv2.groups
    return {(6, 1): "resnet50", (23, 32): "resnext101_32x4d"}.get((blocks, groups), f"{blocks} blocks x{groups}")


def _decay_on(b: Built) -> str:
    wd = b.schedule.weight_decay
    trainable = [p for p in b.model.parameters() if p.requires_grad]
    decayed = {id(p) for g in b.optimizer.param_groups if g["weight_decay"] == wd for p in g["params"]}
    return "all parameters" if all(id(p) in decayed for p in trainable) else "not on 1-D parameters"


def _sampler_name(b: Built) -> str:
    return {"ScoreHLRSampler": "score_hlr", "RandomSampler": "random"}.get(type(b.heads.sampler).__name__, "other")


def _roi_align(pool: Any) -> list:
    return [pool.output_size[0], pool.sampling_ratio, getattr(pool, "aligned", False)]


def _rpn_sampler(b: Built) -> list:
    s = b.model.rpn.fg_bg_sampler
    return [s.batch_size_per_image, s.positive_fraction]


def _c5_channels(b: Built) -> int:
    return b.trunk.layer4[-1].conv3.out_channels


def _matcher(m: Any) -> list[float]:
    return [m.high_threshold, getattr(m, "low_threshold", m.high_threshold)]


# setting -> the built value, compared with the table's
CHECKS: dict[str, Callable[[Built], Any]] = {
    "lr": lambda b: b.schedule.lr if b.schedule.base_batch == b.schedule.total_batch else None,
    "momentum": lambda b: b.optimizer.param_groups[0]["momentum"],
    "weight_decay": lambda b: b.schedule.weight_decay,
    "weight_decay_on": _decay_on,
    "epochs": lambda b: b.schedule.epochs,
    "milestones": lambda b: list(b.schedule.milestones),
    "gamma": lambda b: b.schedule.gamma,
    "warmup_iters": lambda b: b.schedule.warmup_iters,
    "warmup_ratio": lambda b: b.schedule.warmup_ratio,
    "images_per_gpu": lambda b: b.cfg.train.images_per_worker,
    "batch": lambda b: b.schedule.total_batch if b.cfg.train.workers == 8 else None,
    "precision": lambda b: "fp32" if plan_for(b.cfg.train, "cuda", 8, True).autocast_dtype is None else "amp",
    "grad_clip": lambda b: b.cfg.train.grad_clip,
    "image_scale": _image_scale,
    "norm": _norm,
    "frozen_stages": lambda b: (
        [s for s, g in _trunk_stage_grads(b).items() if not g] == ["conv1", "bn1", "layer1"] and 1
    ),
    "fpn_channels": lambda b: b.model.backbone.out_channels,
    "backbone": _backbone,
    "backbone_trainable": lambda b: "all" if all(p.requires_grad for p in b.trunk.parameters()) else "some",
    "rpn_assigner": lambda b: _matcher(b.model.rpn.proposal_matcher),
    "rpn_sampler": lambda b: _rpn_sampler(b),
    "rpn_nms": lambda b: b.model.rpn.nms_thresh,
    "rpn_train_proposals": lambda b: [b.model.rpn._pre_nms_top_n["training"], b.model.rpn._post_nms_top_n["training"]],
    "rpn_test_proposals": lambda b: [b.model.rpn._pre_nms_top_n["testing"], b.model.rpn._post_nms_top_n["testing"]],
    "roi_assigner": lambda b: _matcher(b.heads.proposal_matcher),
    "roi_align": lambda b: _roi_align(b.heads.box_roi_pool),
    "mask_roi_align": lambda b: _roi_align(b.heads.mask_roi_pool),
    "box_head_width": lambda b: b.heads.box_head.fc7.out_features,
    "sampler": _sampler_name,
    "roi_sampler": lambda b: [b.heads.sampler.num, b.heads.sampler.pos_fraction],
    "isr_n": lambda b: [b.heads.sampler.k, b.heads.sampler.bias],
    "isr_p": lambda b: _pisa_values(b.heads.pisa, "isr_p"),
    "carl": lambda b: _pisa_values(b.heads.pisa, "carl"),
    "p6_input": lambda b: "c5" if b.model.backbone.fpn.extra_blocks.p6.in_channels == _c5_channels(b) else "p5",
    "relu_before_p7": lambda b: not _p7_has_no_relu(b),
    "assigner": lambda b: _matcher(b.model.proposal_matcher),
    "neg_pos_ratio": lambda b: b.model.neg_to_pos_ratio,
    "normaliser": lambda b: _normaliser(b, _FakeGroup),
    "test_score_thr": lambda b: b.post.score_thresh,
    "test_nms": lambda b: b.post.nms_thresh,
    "test_max_per_img": lambda b: b.post.detections_per_img,
    "test_nms_pre": lambda b: getattr(b.model, "nms_pre", None) or getattr(b.model, "topk_candidates", None),
}
DATA_CHECKS = {"skip_empty_train", "flip_ratio", "augment"}
LOSSES = {"box_loss": lambda b: b.heads.box_loss, "rpn_box_loss": lambda b: b.model.rpn.box_loss}


def _settings(row: str, kind: str) -> dict[str, dict[str, Any]]:
    per_row = {k: v for k, v in SETUPS[row].items() if isinstance(v, dict) and "value" in v}
    return {**SETUPS[row][kind], **per_row}


def _check(name: str, key: str, actual: Any, setting: dict[str, Any]) -> None:
    want = setting["value"]
    same = actual == pytest.approx(want) if isinstance(want, (int, float)) and not isinstance(want, bool) else None
    if same is None:
        same = actual == want
    assert same, f"{name}: {key} is {actual!r}, the reference's is {want!r} ({setting['from']})"


def test_the_table_covers_every_paper_config():
    shipped = {ref.name for ref in (REPO / "configs").glob("*.yaml") if load_config(ref).reference is not None}
    listed = {SETUPS[row]["configs"][kind] for row, kind in CASES}
    assert listed == shipped
    assert len(SETUPS) == 8


@pytest.mark.parametrize("row, kind", CASES, ids=[f"{r}-{k}" for r, k in CASES])
def test_built_config_matches_the_reference(row: str, kind: str, tmp_path: Path):
    name = SETUPS[row]["configs"][kind]
    b = built(name)
    settings = _settings(row, kind)
    unchecked = set(settings) - set(CHECKS) - DATA_CHECKS - set(LOSSES)
    assert not unchecked, f"the table lists {sorted(unchecked)}, which this test does not check"
    for key, setting in settings.items():
        if key in CHECKS:
            _check(name, key, CHECKS[key](b), setting)
        elif key in LOSSES:
            fn = LOSSES[key](b)
            assert fn is not None and _loss_is(fn, _pair(setting["value"])), (
                f"{name}: {key} is not {setting['value']} ({setting['from']})"
            )
    data = _data(b, tmp_path)
    for key in DATA_CHECKS & set(settings):
        _check(name, key, data[key], settings[key])
    published = SETUPS[row].get("published", {}).get(kind, True)
    reference = b.cfg.reference
    assert reference is not None and reference.published == published and bool(reference.metrics) == published


def test_pisa_paper_says_not_published_for_a_row_without_a_reference_result():
    from types import SimpleNamespace

    from pisa.comparisons.paper import PaperRow, format_paper

    row = PaperRow(
        detector="mask_rcnn_x101",
        baseline=0.41,
        pisa=0.42,
        diff=None,
        diff_ci_low=None,
        diff_ci_high=None,
        seeds=1,
        verdict="failed",
        reference_baseline=0.411,
        reference_pisa=None,
        reference_pisa_published=False,
        reference_diff=None,
        epochs=12,
        images=None,
        reference_budget="COCO 2017 train, 12 epochs",
        failed="",
    )
    text = format_paper(SimpleNamespace(study="s", metric="bbox_mAP", seeds=[0]), [row])  # type: ignore[arg-type]
    assert "41.1 -> not published" in text
