"""RetinaNet and SSD with PISA heads: losses, gradients, ISR-P/CARL maths, inference (CPU, tiny).

Loss-level checks call the heads' `compute_loss` on random head outputs over the real
anchors (cheap); full forward/backward runs use RetinaNet at 128 px and SSD at 268 px,
the smallest input whose VGG pyramid still has all its maps.
"""

from __future__ import annotations

import pytest
import torch
from test_ops import loop_iou_hlr, loop_isr_p
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou

from pisa.core.config import CARLConfig, ISRPConfig, ModelConfig
from pisa.core.errors import BackboneLoadError
from pisa.models.retinanet import PISARetinaNet, build_retinanet
from pisa.models.ssd import PISASSD, _vgg16, build_ssd, ssd_feature_sizes

NUM_CLASSES = 3
RETINA_SIZE = 128
SSD_SIZE = 268
FLAGS = [(False, False), (True, False), (False, True), (True, True)]
FLAG_IDS = ["plain", "isrp", "carl", "isrp+carl"]

_MODELS: dict[str, torch.nn.Module] = {}


def _cfg(detector: str) -> ModelConfig:
    if detector == "retinanet":
        return ModelConfig(detector="retinanet", backbone="resnet18_fpn", min_size=RETINA_SIZE, max_size=RETINA_SIZE)
    return ModelConfig(detector=detector, backbone="vgg16", min_size=SSD_SIZE, max_size=SSD_SIZE)


def _model(detector: str, isr_p: bool, carl: bool) -> torch.nn.Module:
    """One model per detector (VGG16 is slow to build); the PISA switches are set per test."""
    if detector not in _MODELS:
        torch.manual_seed(0)
        cfg = _cfg(detector)
        build = build_retinanet if detector == "retinanet" else build_ssd
        _MODELS[detector] = build(cfg, NUM_CLASSES)
    model = _MODELS[detector]
    model.head.pisa.isr_p = ISRPConfig(enabled=isr_p)
    model.head.pisa.carl = CARLConfig(enabled=carl)
    model.zero_grad(set_to_none=True)
    return model


def _targets(size: int, num_images: int = 2) -> list[dict[str, torch.Tensor]]:
    s = size / 128
    boxes = [
        torch.tensor([[10.0, 10, 60, 70], [50, 40, 120, 110], [70, 5, 100, 40]]) * s,
        torch.tensor([[20.0, 30, 90, 100], [5, 60, 50, 120]]) * s,
    ]
    labels = [torch.tensor([1, 2, 1]), torch.tensor([3, 1])]
    return [{"boxes": boxes[i], "labels": labels[i]} for i in range(num_images)]


def _feature_sizes(detector: str) -> list[int]:
    if detector == "retinanet":
        return [RETINA_SIZE // 2**k for k in range(3, 8)]
    return ssd_feature_sizes(detector, SSD_SIZE)


def _loss_inputs(model, detector: str, num_images: int, seed: int = 0):
    """Random head outputs (leaf tensors) over the model's real anchors and matches."""
    size = RETINA_SIZE if detector == "retinanet" else SSD_SIZE
    targets = _targets(size, num_images)
    images = ImageList(torch.zeros(num_images, 3, size, size), [(size, size)] * num_images)
    features = [torch.zeros(num_images, 1, s, s) for s in _feature_sizes(detector)]
    anchors = model.anchor_generator(images, features)
    matched = [model.proposal_matcher(box_iou(t["boxes"], a)) for t, a in zip(targets, anchors)]
    g = torch.Generator().manual_seed(seed)
    num_anchors = anchors[0].shape[0]
    head_outputs = {
        "cls_logits": (torch.randn(num_images, num_anchors, NUM_CLASSES + 1, generator=g) - 2.0).requires_grad_(),
        "bbox_regression": (0.3 * torch.randn(num_images, num_anchors, 4, generator=g)).requires_grad_(),
    }
    return targets, head_outputs, anchors, matched


def _compute_loss(model, detector, targets, head_outputs, anchors, matched):
    if detector == "retinanet":
        return model.head.compute_loss(targets, head_outputs, anchors, matched)
    return model.compute_loss(targets, head_outputs, anchors, matched)


def _reference_loss(model, detector, targets, head_outputs, anchors, matched):
    """torchvision's own loss on the same inputs."""
    if detector == "retinanet":
        return RetinaNetHead.compute_loss(model.head, targets, head_outputs, anchors, matched)
    return SSD.compute_loss(model, targets, head_outputs, anchors, matched)


DETECTORS = ["retinanet", "ssd300", "ssd512"]


# ------------------------------------------------------------------ full model


@pytest.mark.parametrize("isr_p,carl", FLAGS, ids=FLAG_IDS)
def test_retinanet_train_step(isr_p, carl):
    model = _model("retinanet", isr_p, carl).train()
    torch.manual_seed(1)
    images = [torch.rand(3, RETINA_SIZE, RETINA_SIZE) for _ in range(2)]
    losses = model(images, _targets(RETINA_SIZE))
    assert set(losses) == {"classification", "bbox_regression"} | ({"loss_carl"} if carl else set())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grad = model.backbone.body.conv1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    diag = model.pisa_diagnostics()
    assert ("isr_p_weights" in diag) == isr_p
    assert ("carl_weights" in diag) == carl


def test_retinanet_mobilenet_backbone():
    cfg = ModelConfig(
        detector="retinanet",
        backbone="mobilenet_v3_fpn",
        min_size=RETINA_SIZE,
        max_size=RETINA_SIZE,
        isr_p=ISRPConfig(enabled=True),
        carl=CARLConfig(enabled=True),
    )
    torch.manual_seed(0)
    model = build_retinanet(cfg, NUM_CLASSES).train()
    losses = model([torch.rand(3, RETINA_SIZE, RETINA_SIZE) for _ in range(2)], _targets(RETINA_SIZE))
    assert "loss_carl" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.backbone.body.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


# SSD forward/backward takes seconds per image on CPU; every switch combination is covered
# by the loss-level tests below, so the full model runs only all-off and all-on.
@pytest.mark.parametrize(
    "detector,isr_p,carl",
    [("ssd300", False, False), ("ssd300", True, True), ("ssd512", True, True)],
    ids=["ssd300-plain", "ssd300-isrp+carl", "ssd512-isrp+carl"],
)
def test_ssd_train_step(detector, isr_p, carl):
    model = _model(detector, isr_p, carl).train()
    torch.manual_seed(1)
    images = [torch.rand(3, 200, 240)]  # resized to the fixed SSD input
    losses = model(images, _targets(200, 1))
    assert set(losses) == {"classification", "bbox_regression"} | ({"loss_carl"} if carl else set())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    first_conv = model.backbone.features[0].weight.grad
    assert first_conv is not None and torch.isfinite(first_conv).all() and first_conv.abs().sum() > 0
    assert ("isr_p_weights" in model.pisa_diagnostics()) == isr_p


@pytest.mark.parametrize("detector", ["retinanet", "ssd300"])
def test_eval_returns_detections(detector):
    model = _model(detector, True, True).eval()
    model.score_thresh = 0.0  # untrained scores are tiny
    size = RETINA_SIZE if detector == "retinanet" else 150
    with torch.no_grad():
        out = model([torch.rand(3, size, size + 16)])
    model.score_thresh = _cfg(detector).score_thresh
    assert len(out) == 1
    det = out[0]
    assert det["boxes"].shape[0] > 0 and det["boxes"].shape[1] == 4
    assert det["boxes"].shape[0] <= _cfg(detector).detections_per_img
    assert (det["labels"] >= 1).all() and (det["labels"] <= NUM_CLASSES).all()
    assert (det["boxes"][:, 2] <= size + 16 + 1e-3).all()  # back in the original image frame


def test_builders_respect_config():
    retina = _model("retinanet", False, False)
    assert isinstance(retina, PISARetinaNet)
    assert retina.transform.min_size == (RETINA_SIZE,) and retina.transform.max_size == RETINA_SIZE
    assert retina.score_thresh == 0.05 and retina.detections_per_img == 100
    assert retina.head.classification_head.num_classes == NUM_CLASSES + 1
    assert any(isinstance(m, torch.nn.GroupNorm) for m in retina.head.modules())
    ssd300 = _model("ssd300", False, False)
    assert isinstance(ssd300, PISASSD)
    assert ssd300.transform.fixed_size == (SSD_SIZE, SSD_SIZE)
    assert ssd300.anchor_generator.steps is None  # non-nominal size: boxes tile the real maps


def test_ssd_nominal_layout():
    """At the nominal sizes the pyramids are the SSD paper's."""
    assert ssd_feature_sizes("ssd300", 300) == [38, 19, 10, 5, 3, 1]
    assert ssd_feature_sizes("ssd512", 512) == [64, 32, 16, 8, 4, 2, 1]
    ssd512 = _model("ssd512", False, False)
    assert ssd512.anchor_generator.num_anchors_per_location() == [4, 6, 6, 6, 6, 4, 4]
    with torch.no_grad():
        feats = ssd512.backbone(torch.zeros(1, 3, SSD_SIZE, SSD_SIZE))
    assert [f.shape[-1] for f in feats.values()] == ssd_feature_sizes("ssd512", SSD_SIZE)
    with pytest.raises(ValueError, match="too small"):
        build_ssd(ModelConfig(detector="ssd300", backbone="vgg16", min_size=128), NUM_CLASSES)


def test_vgg16_loads_local_state_dict(tmp_path):
    torch.manual_seed(3)
    source = _vgg16(None)
    path = tmp_path / "vgg16.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in source.features.state_dict(prefix="features.").items()}}, path
    )
    loaded = _vgg16(str(path))
    torch.testing.assert_close(loaded.features[0].weight, source.features[0].weight)
    torch.save({"conv.weight": torch.zeros(3)}, path)
    # a weights file that is not what it claims: exit 2 and no retry (BackboneLoadError)
    with pytest.raises(BackboneLoadError, match="not a VGG16"):
        _vgg16(str(path))


# ------------------------------------------------------------------ loss maths


@pytest.mark.parametrize("detector", DETECTORS)
def test_plain_loss_equals_torchvision(detector):
    """RetinaNet normalises by the batch's positives, torchvision per image: equal for one image."""
    model = _model(detector, False, False)
    inputs = _loss_inputs(model, detector, 1 if detector == "retinanet" else 2)
    ours = _compute_loss(model, detector, *inputs)
    ref = _reference_loss(model, detector, *inputs)
    assert set(ours) == set(ref)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("isr_p,carl", FLAGS, ids=FLAG_IDS)
def test_loss_keys_and_finite(detector, isr_p, carl):
    model = _model(detector, isr_p, carl)
    inputs = _loss_inputs(model, detector, 2)
    losses = _compute_loss(model, detector, *inputs)
    assert ("loss_carl" in losses) == carl
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(inputs[1]["cls_logits"].grad).all()


@pytest.mark.parametrize("detector", DETECTORS)
def test_isr_p_weights_match_ops(detector):
    model = _model(detector, True, False)
    targets, head_outputs, anchors, matched = _loss_inputs(model, detector, 2)
    _compute_loss(model, detector, targets, head_outputs, anchors, matched)
    d = model.pisa_diagnostics()
    # the head's inputs, computed here from the matches and the decoded boxes: GT indices
    # unique across images, labels the GT classes, IoUs of the decoded positives
    num_first = len(targets[0]["boxes"])
    first = torch.cat([m[m >= 0] for m in matched[:1]])
    second = torch.cat([m[m >= 0] for m in matched[1:]]) + num_first
    gt_inds = torch.cat([first, second])
    labels = torch.cat([t["labels"] for t in targets])[gt_inds]
    box_coder = model.head.regression_head.box_coder if detector == "retinanet" else model.box_coder
    fg = torch.stack(matched) >= 0
    pred = box_coder.decode_single(head_outputs["bbox_regression"][fg].detach(), torch.stack(anchors)[fg])
    ious = box_iou(pred, torch.cat([t["boxes"] for t in targets])[gt_inds]).diagonal()
    assert torch.equal(d["gt_inds"], gt_inds) and torch.equal(d["labels"], labels)
    torch.testing.assert_close(d["ious"], ious)
    # the weights: the paper's ISR-P written as loops (tests/test_ops.py) on those inputs
    torch.testing.assert_close(d["iou_hlr"], loop_iou_hlr(ious, labels, gt_inds).to(d["iou_hlr"].dtype))
    expected = loop_isr_p(ious, labels, gt_inds, d["cls_loss"], k=2.0, bias=0.0)
    torch.testing.assert_close(d["isr_p_weights"], expected.to(d["isr_p_weights"].dtype), rtol=1e-5, atol=1e-6)
    assert d["isr_p_weights"].std() > 0  # the weights do rank the positives


@pytest.mark.parametrize("detector", DETECTORS)
def test_isr_p_keeps_positive_loss_magnitude(detector):
    model = _model(detector, True, False)
    inputs = _loss_inputs(model, detector, 2)
    _compute_loss(model, detector, *inputs)
    d = model.pisa_diagnostics()
    weighted = (d["isr_p_weights"] * d["cls_loss"]).sum()
    torch.testing.assert_close(weighted, d["cls_loss"].sum(), rtol=1e-4, atol=1e-4)
    # one image: negatives untouched and positives' sum kept -> the whole loss is unchanged
    single = _loss_inputs(model, detector, 1)
    with_isr_p = _compute_loss(model, detector, *single)["classification"]
    model.head.pisa.isr_p = ISRPConfig(enabled=False)
    without = _compute_loss(model, detector, *single)["classification"]
    torch.testing.assert_close(with_isr_p, without, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("detector", DETECTORS)
def test_carl_gradient_reaches_positive_logits(detector):
    model = _model(detector, False, True)
    targets, head_outputs, anchors, matched = _loss_inputs(model, detector, 2)
    losses = _compute_loss(model, detector, targets, head_outputs, anchors, matched)
    losses["loss_carl"].backward()
    grad = head_outputs["cls_logits"].grad
    fg = torch.stack(matched) >= 0
    assert (grad[fg].abs().sum(-1) > 0).all()
    assert grad[~fg].abs().sum() == 0


@pytest.mark.parametrize("detector", DETECTORS)
def test_no_foreground_gives_finite_zero_positive_losses(detector):
    model = _model(detector, True, True)
    targets, head_outputs, anchors, matched = _loss_inputs(model, detector, 2)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in targets]
    no_match = [torch.full_like(m, -1) for m in matched]
    losses = _compute_loss(model, detector, empty, head_outputs, anchors, no_match)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["bbox_regression"] == 0 and losses["loss_carl"] == 0
    sum(losses.values()).backward()


@pytest.mark.parametrize("detector", DETECTORS)
def test_pisa_losses_of_half_precision_head_outputs_are_float32_and_close(detector):
    """Under autocast a head's outputs are half precision (bf16 on CPU, fp16 on GPU). The
    PISA losses decode and rank in float32: they stay finite, float32, and within bf16's
    rounding of the losses of the same outputs in float32."""
    model = _model(detector, True, True)
    targets, head_outputs, anchors, matched = _loss_inputs(model, detector, 2)
    full = _compute_loss(model, detector, targets, head_outputs, anchors, matched)
    half = {k: v.detach().to(torch.bfloat16).requires_grad_() for k, v in head_outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _compute_loss(model, detector, targets, half, anchors, matched)
    assert set(low) == set(full)
    for key in full:
        assert low[key].dtype == torch.float32 and torch.isfinite(low[key]), key
        torch.testing.assert_close(low[key], full[key].detach(), rtol=3e-2, atol=3e-3)
    sum(low.values()).backward()
    assert all(torch.isfinite(v.grad).all() for v in half.values())
