"""Two-stage detectors with PISA heads: samplers, ISR-P/ISR-N/CARL, backbones (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from pisa.core.config import ModelConfig
from pisa.models import build_backbone, build_detector
from pisa.models.backbones import BackboneLoadError
from pisa.models.roi_heads import PisaRoIHeads, _Samples

SIZE = 128
ROIS = 64
NUM_CLASSES = 3


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(
        backbone="resnet18_fpn",
        min_size=SIZE,
        max_size=SIZE,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        rois_per_image=ROIS,
    )
    base.update(overrides)
    return ModelConfig(**base)


def make_batch(seed: int = 0, masks: bool = False, empty_second: bool = False):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(2):
        images.append(torch.rand(3, SIZE, SIZE, generator=g))
        k = 0 if (empty_second and i == 1) else int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 80
        wh = torch.rand(k, 2, generator=g) * 40 + 8
        boxes = torch.cat([xy, xy + wh], dim=1)
        target = {"boxes": boxes, "labels": torch.randint(1, NUM_CLASSES + 1, (k,), generator=g)}
        if masks:
            m = torch.zeros(k, SIZE, SIZE, dtype=torch.uint8)
            for j, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                m[j, y0:y1, x0:x1] = 1
            target["masks"] = m
        targets.append(target)
    return images, targets


def train_step(cfg: ModelConfig, seed: int = 0, **batch_kwargs):
    torch.manual_seed(seed)
    model = build_detector(cfg, NUM_CLASSES)
    model.train()
    images, targets = make_batch(seed, **batch_kwargs)
    losses = model(images, targets)
    sum(losses.values()).backward()
    return model, losses


def backbone_grad(model: nn.Module) -> torch.Tensor | None:
    return model.backbone.body.layer4[0].conv1.weight.grad


# ---------------------------------------------------------------- training step


@pytest.mark.parametrize("carl", [False, True])
@pytest.mark.parametrize("isr_p", [False, True])
@pytest.mark.parametrize("sampler", ["random", "ohem", "ohem_1to3", "score_hlr"])
def test_faster_rcnn_training_step(sampler, isr_p, carl):
    cfg = tiny_cfg(sampler=sampler, isr_p={"enabled": isr_p}, carl={"enabled": carl})
    model, losses = train_step(cfg)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert ("loss_carl" in losses) == carl
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    grad = backbone_grad(model)
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

    diag = model.pisa_diagnostics()
    assert diag["num_sampled"].tolist() == [ROIS, ROIS]
    assert ("isr_p_weights" in diag) == isr_p
    assert ("carl_weights" in diag) == carl
    if sampler == "score_hlr":
        assert "isr_n_weights" in diag
    assert all(not v.requires_grad for v in diag.values())


@pytest.mark.parametrize("sampler", ["ohem", "score_hlr"])
def test_mask_rcnn_training_and_inference(sampler):
    cfg = tiny_cfg(detector="mask_rcnn", sampler=sampler, isr_p={"enabled": True}, carl={"enabled": True})
    model, losses = train_step(cfg, masks=True)
    assert {"loss_mask", "loss_carl", "loss_classifier"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert backbone_grad(model).abs().sum() > 0
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        out = model(make_batch(1)[0])
    assert len(out) == 2
    for det in out:
        assert {"boxes", "labels", "scores", "masks"} <= set(det)
        assert det["masks"].shape[1:] == (1, SIZE, SIZE)


def test_background_only_image_trains():
    cfg = tiny_cfg(sampler="score_hlr", isr_p={"enabled": True}, carl={"enabled": True})
    model, losses = train_step(cfg, empty_second=True)
    assert all(torch.isfinite(v) for v in losses.values()), losses


def test_eval_matches_torchvision():
    """Inference is torchvision's: same weights give the same detections."""
    cfg = tiny_cfg(sampler="score_hlr", isr_p={"enabled": True}, carl={"enabled": True}, score_thresh=0.0)
    torch.manual_seed(0)
    model = build_detector(cfg, NUM_CLASSES).eval()
    reference = FasterRCNN(
        model.backbone,
        num_classes=NUM_CLASSES + 1,
        min_size=SIZE,
        max_size=SIZE,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        box_score_thresh=0.0,
    ).eval()
    reference.load_state_dict(model.state_dict())
    images = make_batch(3)[0]
    with torch.no_grad():
        ours, theirs = model(images), reference(images)
    assert len(ours) == 2
    for a, b in zip(ours, theirs):
        assert set(a) == {"boxes", "labels", "scores"}
        assert a["boxes"].shape[0] > 0
        for key in a:
            torch.testing.assert_close(a[key], b[key])


# ---------------------------------------------------------------- PISA internals


def test_isr_p_weights_rank_the_positives_by_iou():
    cfg = tiny_cfg(sampler="random", isr_p={"enabled": True, "k": 2.0, "bias": 0.1})
    model, _ = train_step(cfg, seed=4)
    d = model.pisa_diagnostics()
    w, ious, gts, labels = d["isr_p_weights"], d["ious"], d["gt_inds"], d["labels"]
    # the paper's definitions, independent of `pisa_math`: the positives' weighted classification
    # loss equals the unweighted one; around one GT, a higher IoU never weighs less; the
    # best-localised positive of a class (its highest IoU) weighs the most in that class
    loss = d["cls_loss"].float()
    torch.testing.assert_close((w * loss).sum(), loss.sum())
    for g in gts.unique():
        group = (gts == g).nonzero().flatten()
        by_iou = group[ious[group].argsort(descending=True)]
        assert (w[by_iou][1:] <= w[by_iou][:-1] + 1e-6).all()
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        assert w[members[ious[members].argmax()]] >= w[members].max() - 1e-6
    assert w.std() > 0  # the weights do rank the positives
    assert int(d["num_pos"]) == d["isr_p_weights"].numel()
    # GT indices are unique across images: each image's GTs get their own range
    _, targets = make_batch(4)
    assert d["gt_inds"].max() < sum(t["boxes"].shape[0] for t in targets)
    assert ((d["ious"] >= 0) & (d["ious"] <= 1)).all()


def test_gt_inds_unique_across_images():
    heads = build_detector(tiny_cfg(), NUM_CLASSES).roi_heads.train()
    _, targets = make_batch(5)
    counts = [t["boxes"].shape[0] for t in targets]
    proposals = [t["boxes"] + 0.5 for t in targets]  # one positive proposal per GT (plus the GTs)
    samples = heads.select_pisa_samples({}, proposals, [(SIZE, SIZE)] * 2, targets)
    pos = samples.labels > 0
    per_image = [m.numel() for m in samples.matched_idxs]
    first = torch.arange(samples.labels.numel()) < per_image[0]
    assert sorted(samples.gt_inds[pos & first].tolist()) == sorted(list(range(counts[0])) * 2)
    assert sorted(samples.gt_inds[pos & ~first].tolist()) == sorted(list(range(counts[0], counts[0] + counts[1])) * 2)
    all_gt = torch.cat([t["boxes"] for t in targets])
    torch.testing.assert_close(samples.gt_boxes[pos], all_gt[samples.gt_inds[pos]])


@pytest.mark.parametrize("sampler", ["ohem", "ohem_1to3"])
def test_ohem_keeps_highest_loss(sampler):
    model, _ = train_step(tiny_cfg(sampler=sampler))
    d = model.pisa_diagnostics()
    loss, labels = d["roi_loss"], d["roi_labels"]
    sampled = torch.zeros(loss.numel(), dtype=torch.bool)
    sampled[d["sampled_inds"]] = True
    assert d["sampled_inds"].unique().numel() == d["sampled_inds"].numel() == 2 * ROIS
    start = 0
    for count in d["num_proposals"].tolist():
        sl = slice(start, start + count)
        start += count
        groups = [labels[sl] >= 0] if sampler == "ohem" else [labels[sl] > 0, labels[sl] == 0]
        for group in groups:
            chosen, left = loss[sl][group & sampled[sl]], loss[sl][group & ~sampled[sl]]
            assert not (sampled[sl] & (labels[sl] < 0)).any()
            if chosen.numel() and left.numel():
                assert chosen.min() >= left.max() - 1e-6
    assert start == loss.numel()


def _synthetic_samples(heads: PisaRoIHeads, n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 60
    proposals = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 30], 1)
    gt = proposals + torch.randn(n, 4, generator=g)
    labels = torch.randint(0, NUM_CLASSES + 1, (n,), generator=g)
    labels[:4] = torch.tensor([1, 2, 1, 3])
    samples = _Samples(
        proposals=[proposals[:25], proposals[25:]],
        matched_idxs=[torch.zeros(25, dtype=torch.long), torch.zeros(n - 25, dtype=torch.long)],
        labels=labels,
        regression_targets=heads.box_coder.encode_single(gt, proposals),
        gt_boxes=gt,
        gt_inds=torch.randint(0, 5, (n,), generator=g),
        label_weights=torch.ones(n),
    )
    logits = torch.randn(n, NUM_CLASSES + 1, generator=g, requires_grad=True)
    deltas = torch.randn(n, 4 * (NUM_CLASSES + 1), generator=g, requires_grad=True)
    return samples, logits, deltas


def test_plain_losses_equal_torchvision():
    model = build_detector(tiny_cfg(), NUM_CLASSES)
    heads = model.roi_heads
    samples, logits, deltas = _synthetic_samples(heads)
    ours = heads.pisa_box_loss(logits, deltas, samples)
    cls, box = fastrcnn_loss(logits, deltas, [samples.labels], [samples.regression_targets])
    torch.testing.assert_close(ours["loss_classifier"], cls)
    torch.testing.assert_close(ours["loss_box_reg"], box)
    assert "loss_carl" not in ours


def test_carl_loss_is_added_and_reaches_scores():
    model = build_detector(tiny_cfg(carl={"enabled": True, "k": 1.0, "bias": 0.2}), NUM_CLASSES)
    heads = model.roi_heads
    samples, logits, deltas = _synthetic_samples(heads)
    ours = heads.pisa_box_loss(logits, deltas, samples)
    _, box = fastrcnn_loss(logits, deltas, [samples.labels], [samples.regression_targets])
    torch.testing.assert_close(ours["loss_box_reg"], box)  # the box loss stays

    pos = torch.where(samples.labels > 0)[0]
    lab = samples.labels[pos]
    reg = torch.nn.functional.smooth_l1_loss(
        deltas.reshape(len(samples.labels), -1, 4)[pos, lab],
        samples.regression_targets[pos],
        beta=1 / 9,
        reduction="none",
    )
    # the paper's CARL, written out per positive: v_i = (b + (1 - b) p_i)^k, weights
    # c_i = n v_i / sum(v), loss = sum_i c_i * L_i / (number of sampled RoIs)
    probs = logits.softmax(-1)
    v = [(0.2 + 0.8 * float(probs[i, c])) ** 1.0 for i, c in zip(pos.tolist(), lab.tolist())]
    c = [len(v) * vi / sum(v) for vi in v]
    expected = sum(ci * float(reg[j].sum()) for j, ci in enumerate(c)) / len(samples.labels)
    assert float(ours["loss_carl"]) == pytest.approx(expected, rel=1e-5)
    ours["loss_carl"].backward()
    assert logits.grad[pos].abs().sum() > 0


def test_isr_n_weights_apply_to_negatives():
    model = build_detector(tiny_cfg(), NUM_CLASSES)
    heads = model.roi_heads
    samples, logits, deltas = _synthetic_samples(heads)
    neg = samples.labels == 0
    samples.label_weights[neg] = torch.linspace(0.5, 1.5, int(neg.sum()))
    ours = heads.pisa_box_loss(logits, deltas, samples)
    ce = torch.nn.functional.cross_entropy(logits, samples.labels, reduction="none")
    torch.testing.assert_close(ours["loss_classifier"], (ce * samples.label_weights).sum() / len(ce))


# ---------------------------------------------------------------- builder


def test_build_detector_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_detector(tiny_cfg())
    model = build_detector(tiny_cfg(num_classes=5))
    assert model.roi_heads.box_predictor.cls_score.out_features == 6
    model = build_detector(tiny_cfg(num_classes=5), 2)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert isinstance(model.roi_heads, PisaRoIHeads)
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == ROIS
    assert model.rpn._post_nms_top_n["training"] == 300
    assert model.pisa_diagnostics() == {}


def test_box_head_width():
    # the default is torchvision's own head: the same seed gives torchvision's initial weights
    torch.manual_seed(0)
    ours = build_detector(tiny_cfg(), NUM_CLASSES)
    torch.manual_seed(0)
    reference = FasterRCNN(build_backbone(tiny_cfg()), num_classes=NUM_CLASSES + 1)
    for name in ("fc6", "fc7"):
        assert torch.equal(
            getattr(ours.roi_heads.box_head, name).weight, getattr(reference.roi_heads.box_head, name).weight
        )
    assert torch.equal(
        ours.roi_heads.box_predictor.cls_score.weight, reference.roi_heads.box_predictor.cls_score.weight
    )

    # narrower: both FC layers and the predictor's input; it trains with ISR-N's ranking pass
    model, losses = train_step(tiny_cfg(box_head_width=64, sampler="score_hlr"))
    head, predictor = model.roi_heads.box_head, model.roi_heads.box_predictor
    assert (head.fc6.in_features, head.fc6.out_features, head.fc7.out_features) == (256 * 7 * 7, 64, 64)
    assert (predictor.cls_score.in_features, predictor.cls_score.out_features) == (64, NUM_CLASSES + 1)
    assert all(torch.isfinite(v) for v in losses.values())
    assert head.fc6.weight.grad is not None and head.fc6.weight.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="box_head_width is for two-stage detectors"):
        ModelConfig(detector="retinanet", box_head_width=256)


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_fpn_channels(norm):
    # every pyramid level, the RPN head, the pooled features the box head sees, the mask head
    cfg = tiny_cfg(fpn_channels=96, norm=norm, sampler="score_hlr", box_head_width=64)
    bb = build_backbone(cfg)
    assert bb.out_channels == 96 and bb.in_channels_list == [64, 128, 256, 512]
    with torch.no_grad():
        levels = bb(torch.rand(1, 3, 64, 64))
    assert [tuple(v.shape[:2]) for v in levels.values()] == [(1, 96)] * 5  # P2-P5 + max-pooled P6
    model, losses = train_step(cfg)
    assert model.rpn.head.conv[0][0].in_channels == 96
    assert model.roi_heads.box_head.fc6.in_features == 96 * 7 * 7
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0  # the narrow FPN trains
    mask = build_detector(tiny_cfg(detector="mask_rcnn", fpn_channels=64), NUM_CLASSES)
    assert mask.roi_heads.mask_head[0][0].in_channels == 64

    # RetinaNet's P6/P7 follow the width; SSD has no FPN
    retina = build_detector(tiny_cfg(detector="retinanet", fpn_channels=64), NUM_CLASSES)
    assert retina.backbone.fpn.extra_blocks.p6.out_channels == 64
    assert retina.head.classification_head.conv[0][0].in_channels == 64
    with pytest.raises(ValueError, match="fpn_channels is for FPN backbones"):
        ModelConfig(detector="ssd300", backbone="vgg16", fpn_channels=128)
    with pytest.raises(ValueError, match="multiple of 32"):
        ModelConfig(fpn_channels=100)


# ---------------------------------------------------------------- backbones


def _saved_trunk(tmp_path, wrap):
    torch.manual_seed(123)
    trunk = ResNet(BasicBlock, [2, 2, 2, 2])
    state = trunk.state_dict()
    path = tmp_path / "trunk.pth"
    torch.save(wrap(state), path)
    return state, path


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": {"module." + k: v for k, v in s.items()}},
        lambda s: {"model": {"backbone.body." + k: v for k, v in s.items()}, "epoch": 3},
    ],
    ids=["plain", "state_dict+module", "model+backbone.body"],
)
def test_backbone_loads_local_file(tmp_path, wrap):
    state, path = _saved_trunk(tmp_path, wrap)
    body = build_backbone(tiny_cfg(pretrained_backbone=str(path), trainable_backbone_layers=3)).body
    own = body.state_dict()
    for key in (
        "conv1.weight",
        "layer1.0.conv1.weight",
        "layer4.1.conv2.weight",
        "layer4.1.bn2.running_var",
        "bn1.weight",
    ):
        torch.testing.assert_close(own[key], state[key], rtol=0, atol=0)
    assert isinstance(body.bn1, FrozenBatchNorm2d)  # auto + pretrained = frozen BN
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad


def test_backbone_bad_file_errors(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"state_dict": nn.Linear(4, 4).state_dict()}, other)
    with pytest.raises(BackboneLoadError, match="other.pth"):
        build_backbone(tiny_cfg(pretrained_backbone=str(other)))
    # another architecture: same key names, mostly other shapes (ResNet-18 file, ResNet-50 trunk)
    _, r18 = _saved_trunk(tmp_path, lambda s: s)
    with pytest.raises(BackboneLoadError, match="trunk.pth"):
        build_backbone(tiny_cfg(backbone="resnet50_fpn", pretrained_backbone=str(r18)))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneLoadError, match="junk.pt"):
        build_backbone(tiny_cfg(pretrained_backbone=str(junk)))
    with pytest.raises(BackboneLoadError, match="missing.pth"):
        build_backbone(tiny_cfg(pretrained_backbone=str(tmp_path / "missing.pth")))
    with pytest.raises(BackboneLoadError, match="neither"):
        build_backbone(tiny_cfg(pretrained_backbone="NoSuch_Weights.X"))


def test_mobilenet_loads_full_model_checkpoint(tmp_path):
    from torchvision.models import mobilenet_v3_large

    torch.manual_seed(7)
    full = mobilenet_v3_large(weights=None)
    path = tmp_path / "mnv3.pth"
    torch.save(full.state_dict(), path)
    body = build_backbone(tiny_cfg(backbone="mobilenet_v3_fpn", pretrained_backbone=str(path))).body
    torch.testing.assert_close(body.state_dict()["4.block.0.0.weight"], full.features[4].block[0][0].weight)


@pytest.mark.parametrize(
    ("norm", "kind", "absent"),
    [
        ("bn", nn.BatchNorm2d, FrozenBatchNorm2d),
        ("auto", nn.BatchNorm2d, FrozenBatchNorm2d),
        ("gn", nn.GroupNorm, nn.BatchNorm2d),
        ("frozen_bn", FrozenBatchNorm2d, nn.BatchNorm2d),
    ],
)
@pytest.mark.parametrize("backbone", ["resnet18_fpn", "mobilenet_v3_fpn"])
def test_norm_choices(norm, kind, absent, backbone):
    bb = build_backbone(tiny_cfg(backbone=backbone, norm=norm))
    modules = list(bb.body.modules())
    assert any(isinstance(m, kind) for m in modules)
    assert not any(isinstance(m, absent) for m in modules)
    if norm == "gn":
        assert any(isinstance(m, nn.GroupNorm) for m in bb.fpn.modules())
    # from scratch every trunk parameter trains
    assert all(p.requires_grad for p in bb.parameters())
    out = bb(torch.rand(2, 3, 64, 64))
    assert list(out) == ["0", "1", "2", "3", "pool"] and out["0"].shape == (2, 256, 16, 16)


def test_resnext101_32x4d():
    bb = build_backbone(tiny_cfg(backbone="resnext101_32x4d_fpn"))
    body = bb.body
    assert len(body.layer3) == 23
    first, last = body.layer1[0], body.layer4[0]
    assert first.conv2.groups == 32 and first.conv2.in_channels == 128 and first.conv2.out_channels == 128
    assert first.conv2.weight.shape == (128, 4, 3, 3)  # 4 channels per group
    assert last.conv2.groups == 32 and last.conv2.out_channels == 1024 and last.conv3.out_channels == 2048
    assert bb.in_channels_list == [256, 512, 1024, 2048]
    with torch.no_grad():
        out = bb(torch.rand(1, 3, 64, 64))
    assert out["3"].shape == (1, 256, 2, 2)


def test_backbone_for_single_stage_levels():
    """P3-P7 as RetinaNet uses them: stages 2-4 plus P6/P7."""
    bb = build_backbone(tiny_cfg(), returned_layers=(2, 3, 4), extra_blocks=LastLevelP6P7(256, 256))
    assert bb.out_channels == 256 and bb.in_channels_list == [128, 256, 512]
    out = bb(torch.rand(1, 3, 128, 128))
    assert [v.shape[-1] for v in out.values()] == [16, 8, 4, 2, 1]


def test_diagnostics_off_keeps_nothing():
    model, _ = train_step(tiny_cfg(diagnostics=False, sampler="ohem", isr_p={"enabled": True}))
    assert model.pisa_diagnostics() == {}


def test_mixed_precision_training_step():
    """Under autocast (bf16 on CPU, as fp16 on GPU) the PISA losses stay float32 and finite."""
    cfg = tiny_cfg(sampler="score_hlr", isr_p={"enabled": True}, carl={"enabled": True})
    torch.manual_seed(0)
    model = build_detector(cfg, NUM_CLASSES).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(*make_batch(0))
    sum(losses.values()).backward()
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    assert backbone_grad(model).abs().sum() > 0


# bf16 once: emulated bf16 kernels make it minutes on a CPU without bf16 units
@pytest.mark.parametrize(
    "sampler, autocast, roi_align",
    [
        ("score_hlr", False, None),
        ("ohem", False, None),
        ("score_hlr", True, None),
        ("score_hlr", False, {"sampling_ratio": 0, "aligned": True}),
    ],
    ids=["score_hlr-fp32", "ohem-fp32", "score_hlr-bf16", "score_hlr-aligned"],
)
def test_sampled_rois_reuse_the_ranking_pass(sampler, autocast, roi_align):
    """Reusing the ranking pass's pooled features and head outputs for the sampled RoIs gives
    the losses and gradients of a second forward pass over them (mmdetection 2.x's aligned
    RoIAlign too)."""
    import copy

    cfg = tiny_cfg(sampler=sampler, isr_p={"enabled": True}, carl={"enabled": True}, roi_align=roi_align)
    torch.manual_seed(0)
    reused = build_detector(cfg, NUM_CLASSES).train()
    recomputed = copy.deepcopy(reused)
    recomputed.roi_heads.reuse_ranking_pass = False
    images, targets = make_batch(2)
    results = []
    for model in (reused, recomputed):
        torch.manual_seed(5)  # same random draws in the samplers
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses = model(images, targets)
        sum(losses.values()).backward()
        results.append((losses, model))
    (l_a, a), (l_b, b) = results
    assert set(l_a) == set(l_b)
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-6)
    for key in l_a:
        torch.testing.assert_close(l_a[key], l_b[key], **tol)
    # gradients, as fractions of each tensor's largest: the two passes sum in other orders
    # (a CPU's kernels block the all-proposal and the sampled batch differently), up to
    # 1.5e-6 of the largest in fp32 and 1.2e-2 in bf16 (8 mantissa bits, rounded at every
    # layer of the backward) on an Intel Xeon; a wrong reuse is off by the gradient itself
    tol = dict(rtol=2e-2, atol=3e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    grads_b = dict(b.named_parameters())
    checked = 0
    for name, p in a.named_parameters():
        if p.grad is None:
            assert grads_b[name].grad is None, name
            continue
        scale = grads_b[name].grad.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(p.grad / scale, grads_b[name].grad / scale, **tol)
        checked += 1
    assert checked > 20
    assert a.roi_heads.box_head.fc6.weight.grad.abs().sum() > 0
