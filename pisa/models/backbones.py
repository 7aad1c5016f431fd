"""FPN backbones for the detectors: a ResNet/ResNeXt/MobileNetV3 trunk under torchvision's FPN.

The norm layer follows the weights: frozen BN is right for ImageNet weights (the
statistics are good and batches per GPU are small), but from scratch a frozen BN is an
identity and nothing in it learns, so training from scratch uses trainable BN (or GN).
Pretrained weights come from a torchvision weights enum or a local checkpoint file; a
checkpoint that matches less than half of the trunk is an error, not a silent no-op.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import cast

import torch
import torchvision
from torch import nn
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _mobilenet_extractor,
    _resnet_fpn_extractor,
)
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork
from torchvision.ops.misc import FrozenBatchNorm2d

from pisa.core.errors import BackboneLoadError
from pisa.core.model_config import TORCHVISION_FPN_CHANNELS, ModelConfig

__all__ = ["AffineFrozenBatchNorm2d", "build_backbone", "resolve_norm", "load_trunk_weights", "BackboneLoadError"]

log = logging.getLogger(__name__)

_STRIP_PREFIXES = ("module.", "backbone.body.", "body.")


def _group_norm(num_channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups, fewer where the channel count is not a multiple of 32."""
    return nn.GroupNorm(math.gcd(groups, num_channels), num_channels)


def resolve_norm(cfg: ModelConfig) -> str:
    """The effective norm name: `auto` means frozen BN with pretrained weights, BN without."""
    if cfg.norm == "auto":
        return "frozen_bn" if cfg.pretrained_backbone else "bn"
    return cfg.norm


class AffineFrozenBatchNorm2d(FrozenBatchNorm2d):
    """Frozen statistics, trainable scale and shift: mmdetection's BN with `norm_eval=True` and
    `requires_grad=True`. Not a `_BatchNorm`, so SyncBatchNorm conversion leaves it alone, and
    the state-dict keys are FrozenBatchNorm2d's (checkpoints load either way)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        weight, bias = self._buffers.pop("weight"), self._buffers.pop("bias")
        assert weight is not None and bias is not None
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)


def _norm_layers(norm: str, bn_eps: float = 1e-5, bn_momentum: float = 0.1, affine: bool = False):
    """(trunk norm layer, FPN norm layer or None) for a norm name; `affine`: frozen BN whose
    scale and shift train."""
    match norm:
        case "frozen_bn":
            return (AffineFrozenBatchNorm2d if affine else FrozenBatchNorm2d), None
        case "bn":
            return partial(nn.BatchNorm2d, eps=bn_eps, momentum=bn_momentum), None
        case "gn":
            return _group_norm, _group_norm
        case _:
            raise ValueError(f"unknown norm {norm!r}")


def _build_trunk(name: str, norm_layer: Callable[..., nn.Module]) -> nn.Module:
    match name:
        case "resnet50_fpn":
            return ResNet(Bottleneck, [3, 4, 6, 3], norm_layer=norm_layer)
        case "resnext101_32x4d_fpn":
            return ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4, norm_layer=norm_layer)
        case "resnet18_fpn":
            return ResNet(BasicBlock, [2, 2, 2, 2], norm_layer=norm_layer)
        case "mobilenet_v3_fpn":
            return mobilenet_v3_large(weights=None, norm_layer=norm_layer)
        case _:
            raise ValueError(f"backbone {name!r} has no FPN trunk here (vgg16 is built by the SSD model)")


def _clean_state_dict(state: Mapping[str, torch.Tensor], extra_prefixes: Sequence[str] = ()) -> dict:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in (*_STRIP_PREFIXES, *extra_prefixes):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _read_checkpoint(path: Path) -> Mapping[str, torch.Tensor]:
    """A state_dict from a .pth/.pt file: plain, or under 'state_dict' / 'model'.

    `weights_only=True` because the file may come from anywhere: it must not run code.
    """
    if not path.is_file():
        raise BackboneLoadError(f"pretrained backbone file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickled code, wrong format
        raise BackboneLoadError(f"pretrained backbone file {path} could not be read: {exc}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise BackboneLoadError(f"pretrained backbone file {path} holds a {type(obj).__name__}, not a state_dict")
    return obj


def load_trunk_weights(
    trunk: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    extra_prefixes: Sequence[str] = (),
) -> int:
    """Load the matching tensors of `state` into `trunk`; returns how many matched.

    Keys are matched after stripping 'module.' / 'backbone.body.' prefixes; tensors of
    another shape are skipped. Raises if the matched tensors hold fewer than half of the
    trunk's weights (counted in elements, so that a checkpoint of another depth or width,
    whose small norm vectors happen to fit, is not loaded as a few scattered layers).
    """
    state = _clean_state_dict(state, extra_prefixes)
    own = {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    total = sum(v.numel() for v in own.values())
    matched = sum(own[k].numel() for k in usable)
    if matched < total / 2:
        shape_mismatch = sum(1 for k, v in state.items() if k in own and v.shape != own[k].shape)
        raise BackboneLoadError(
            f"pretrained backbone {source} matches only {len(usable)} of the trunk's {len(own)} "
            f"tensors ({matched / max(total, 1):.0%} of its weights; {shape_mismatch} tensors with "
            f"another shape, {len(state)} in the file): wrong architecture or key layout?"
        )
    trunk.load_state_dict(usable, strict=False)
    log.info(
        "loaded %d of %d trunk tensors (%.0f%% of the weights) from %s",
        len(usable),
        len(own),
        100 * matched / max(total, 1),
        source,
    )
    return len(usable)


def _pretrained_state(spec: str) -> tuple[Mapping[str, torch.Tensor], str]:
    """(state_dict, description) for a weights enum name or a local file."""
    if spec.endswith((".pth", ".pt")) or Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        return _read_checkpoint(path), str(path)
    try:
        weights = torchvision.models.get_weight(spec)
    except (ValueError, KeyError) as exc:
        raise BackboneLoadError(
            f"pretrained_backbone {spec!r} is neither a local .pth/.pt file nor a torchvision "
            f"weights name like 'ResNet50_Weights.IMAGENET1K_V1'"
        ) from exc
    try:
        return weights.get_state_dict(progress=False), spec
    except Exception as exc:  # offline machine, interrupted download
        raise BackboneLoadError(
            f"could not fetch torchvision weights {spec} ({exc}); on a machine without network, "
            f"save them once with torch.save(model.state_dict(), 'file.pth') and pass the file"
        ) from exc


def build_backbone(
    cfg: ModelConfig,
    *,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    extra_blocks: ExtraFPNBlock | None = None,
) -> BackboneWithFPN:
    """The configured trunk + FPN (`cfg.fpn_channels`, torchvision's 256 by default);
    `.in_channels_list` = trunk channels per level.

    `returned_layers` index the trunk stages (1..4 = strides 4..32 for both ResNets and
    MobileNetV3). Layers are frozen per `cfg.trainable_backbone_layers` only with
    pretrained weights; from scratch everything trains.
    """
    norm = resolve_norm(cfg)
    if norm == "frozen_bn" and not cfg.pretrained_backbone:
        log.warning("norm 'frozen_bn' without pretrained weights: the BN layers are identities and never learn")
    is_mobilenet = cfg.backbone == "mobilenet_v3_fpn"
    # MobileNetV3's own BN settings suit its pretrained statistics; from scratch their slow
    # momentum (0.01) leaves the running statistics far behind the weights in short runs
    eps, momentum = (0.001, 0.01) if is_mobilenet and cfg.pretrained_backbone else (1e-5, 0.1)
    trunk_norm, fpn_norm = _norm_layers(norm, eps, momentum, affine=cfg.frozen_bn_affine)
    model = _build_trunk(cfg.backbone, trunk_norm)

    if cfg.pretrained_backbone:
        state, source = _pretrained_state(cfg.pretrained_backbone)
        if is_mobilenet:
            load_trunk_weights(cast(nn.Module, model.features), state, source, extra_prefixes=("features.",))
        else:
            load_trunk_weights(model, state, source)
        trainable = cfg.trainable_backbone_layers
    else:
        trainable = 5

    layers = list(returned_layers)
    if is_mobilenet:
        # MobileNetV3 has 6 stages (stem .. last conv); 5 trainable stages leave the stem frozen.
        trainable = 6 if not cfg.pretrained_backbone else trainable
        backbone = _mobilenet_extractor(model, True, trainable, layers, extra_blocks, norm_layer=fpn_norm)
        features = cast(nn.Sequential, model.features)
        stage_indices = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
        stage_indices.append(len(features) - 1)
        in_channels = [features[stage_indices[i]].out_channels for i in layers]
    else:
        backbone = _resnet_fpn_extractor(model, trainable, layers, extra_blocks, norm_layer=fpn_norm)
        in_channels = [cast(int, model.inplanes) // 8 * 2 ** (i - 1) for i in layers]
    backbone.in_channels_list = in_channels
    if cfg.fpn_channels != TORCHVISION_FPN_CHANNELS:
        # torchvision's extractors build a 256-wide FPN; the default keeps their modules, so a
        # seed gives the same initial weights as it always did
        backbone.fpn = FeaturePyramidNetwork(
            in_channels, cfg.fpn_channels, extra_blocks=backbone.fpn.extra_blocks, norm_layer=fpn_norm
        )
        backbone.out_channels = cfg.fpn_channels
    return backbone
