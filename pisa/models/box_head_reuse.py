"""Reuse of the ranking pass's box-head outputs for the sampled RoIs (OHEM, Score-HLR).

Samplers that rank proposals by the head's own predictions run RoI pooling and the box head
over every proposal without gradients. The sampled RoIs are a subset of those proposals, so
their pooled features, activations and outputs are already known: this module returns them
as the training outputs and supplies the gradients with an explicit backward (linear layers,
ReLUs, RoIAlign), instead of pooling and running the head over the sampled RoIs a second time.

It applies to torchvision's default layout (MultiScaleRoIAlign -> TwoMLPHead ->
FastRCNNPredictor); other heads fall back to a second forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input

from pisa.models.roi_align import AlignedMultiScaleRoIAlign

__all__ = ["HeadPass", "can_reuse", "forward_all", "reuse_sampled"]


@dataclass
class HeadPass:
    """No-grad pass of pooling + box head over all proposals, with what a backward needs."""

    x: Tensor  # (N, C*h*w) flattened pooled features
    h6: Tensor  # (N, D) after fc6 + ReLU
    h7: Tensor  # (N, D) after fc7 + ReLU
    logits: Tensor  # (N, K)
    deltas: Tensor  # (N, 4K)


def can_reuse(pool: nn.Module, head: nn.Module, predictor: nn.Module) -> bool:
    return (
        type(pool) in (MultiScaleRoIAlign, AlignedMultiScaleRoIAlign)
        and type(head) is TwoMLPHead
        and type(predictor) is FastRCNNPredictor
    )


@torch.no_grad()
def forward_all(
    pool: MultiScaleRoIAlign,
    head: TwoMLPHead,
    predictor: FastRCNNPredictor,
    features: dict[str, Tensor],
    proposals: list[Tensor],
    image_shapes: list[tuple[int, int]],
) -> HeadPass:
    """The same operations as `predictor(head(pool(...)))`, keeping the activations."""
    x = pool(features, proposals, image_shapes).flatten(start_dim=1)
    h6 = F.relu(head.fc6(x))
    h7 = F.relu(head.fc7(h6))
    return HeadPass(x, h6, h7, predictor.cls_score(h7), predictor.bbox_pred(h7))


def reuse_sampled(
    pool: MultiScaleRoIAlign,
    head: TwoMLPHead,
    predictor: FastRCNNPredictor,
    features: dict[str, Tensor],
    sampled_proposals: list[Tensor],
    cached: HeadPass,
    inds: Tensor,
) -> tuple[Tensor, Tensor]:
    """(class logits, box deltas) of the sampled RoIs (`inds` into the cached rows), with gradients."""
    maps = _filter_input(features, pool.featmap_names)
    rois = _convert_to_roi_format(sampled_proposals)
    levels = (
        pool.map_levels(sampled_proposals)
        if len(maps) > 1
        else torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    )
    aligned = getattr(pool, "aligned", False)  # torchvision's MultiScaleRoIAlign: False
    geometry = (rois, levels, list(pool.scales), pool.output_size, pool.sampling_ratio, aligned, cached.x.dtype)
    params = (
        head.fc6.weight,
        head.fc6.bias,
        head.fc7.weight,
        head.fc7.bias,
        predictor.cls_score.weight,
        predictor.cls_score.bias,
        predictor.bbox_pred.weight,
        predictor.bbox_pred.bias,
    )
    return _ReusedBoxHead.apply(
        geometry,
        cached.x[inds],
        cached.h6[inds],
        cached.h7[inds],
        cached.logits[inds],
        cached.deltas[inds],
        *params,
        *maps,
    )


def _linear_grads(grad_out: Tensor, inp: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(grad of input, weight, bias) of `inp @ weight.T + bias`, in the activations' dtype."""
    w = weight.to(grad_out.dtype)
    return grad_out @ w, (grad_out.t() @ inp).to(weight.dtype), grad_out.sum(0).to(weight.dtype)


class _ReusedBoxHead(torch.autograd.Function):
    """Forward: the cached outputs. Backward: predictor, fc7, fc6 and RoIAlign by hand."""

    @staticmethod
    def forward(ctx, geometry, x, h6, h7, logits, deltas, w6, b6, w7, b7, wc, bc, wb, bb, *maps):
        ctx.geometry = geometry
        ctx.map_shapes = [(m.shape, m.dtype) for m in maps]
        ctx.save_for_backward(x, h6, h7, w6, w7, wc, wb)
        return logits.clone(), deltas.clone()

    @staticmethod
    def backward(ctx, g_logits, g_deltas):
        x, h6, h7, w6, w7, wc, wb = ctx.saved_tensors
        dtype = h7.dtype
        g_logits = g_logits.to(dtype) if g_logits is not None else h7.new_zeros(h7.shape[0], wc.shape[0])
        g_deltas = g_deltas.to(dtype) if g_deltas is not None else h7.new_zeros(h7.shape[0], wb.shape[0])
        g_h7c, g_wc, g_bc = _linear_grads(g_logits, h7, wc)
        g_h7b, g_wb, g_bb = _linear_grads(g_deltas, h7, wb)
        g_z7 = (g_h7c + g_h7b) * (h7 > 0)
        g_h6, g_w7, g_b7 = _linear_grads(g_z7, h6, w7)
        g_z6 = g_h6 * (h6 > 0)
        g_x, g_w6, g_b6 = _linear_grads(g_z6, x, w6)

        rois, levels, scales, output_size, sampling_ratio, aligned, _ = ctx.geometry
        g_pooled = g_x.float().reshape(g_x.shape[0], -1, *output_size)
        g_maps = []
        for level, ((shape, map_dtype), scale) in enumerate(zip(ctx.map_shapes, scales)):
            idx = torch.where(levels == level)[0]
            batch, channels, height, width = shape
            g = torch.ops.torchvision._roi_align_backward(
                g_pooled[idx].contiguous(),
                rois[idx].float(),
                scale,
                output_size[0],
                output_size[1],
                batch,
                channels,
                height,
                width,
                sampling_ratio,
                aligned,
            )
            g_maps.append(g.to(map_dtype))
        return (None, None, None, None, None, None, g_w6, g_b6, g_w7, g_b7, g_wc, g_bc, g_wb, g_bb, *g_maps)
