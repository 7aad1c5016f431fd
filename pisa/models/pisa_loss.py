"""PISA's losses in one place, shared by the two-stage, RetinaNet and SSD heads.

Every head hands its positives here the same way (decoded-box inputs, labels, batch-unique
GT indices, unweighted classification loss, per-coordinate box loss) and gets back the
ISR-P weights of the positives and the CARL term. The maths is `pisa.core.pisa_math`; this
module adds what the heads had in common around it: the box loss chosen by config, IoUs of
decoded boxes in float32 whatever the autocast dtype, and one diagnostics record per step.

Diagnostics stay on the device as detached tensors (no host sync per step); the training
loop copies them once per logging interval through `collect_diagnostics`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder

from pisa.core.config import BoxLossConfig, CARLConfig, ISRPConfig
from pisa.core.pisa_math import carl_loss, carl_weights, iou_hlr, isr_p_weights, mask_groups

__all__ = [
    "AnchorPositives",
    "DiagnosticsMixin",
    "PisaDiagnostics",
    "PisaLoss",
    "aligned_box_iou",
    "box_loss_fn",
    "collect_diagnostics",
    "decoded_ious",
    "mean_over_workers",
]

BoxLossFn = Callable[[Tensor, Tensor], Tensor]


def box_loss_fn(cfg: BoxLossConfig | None, default: BoxLossConfig) -> BoxLossFn:
    """Element-wise box regression loss `(pred, target) -> (P, 4)`, computed in float32.

    `cfg=None` keeps the detector's torchvision loss (`default`).
    """
    cfg = cfg or default
    if cfg.type == "l1":
        return lambda pred, target: F.l1_loss(pred.float(), target.float(), reduction="none")
    beta = cfg.beta
    return lambda pred, target: F.smooth_l1_loss(pred.float(), target.float(), beta=beta, reduction="none")


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of each box in `boxes1` with the box at the same row of `boxes2` (x1y1x2y2), (N,)."""
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area1 + area2 - inter).clamp(min=eps)


@torch.no_grad()
def decoded_ious(box_coder: BoxCoder, deltas: Tensor, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """IoU of the boxes decoded from `deltas` on `boxes` with their GTs, in float32.

    Under fp16/bf16 autocast the head's deltas (and often the anchors) are half precision;
    decoding there rounds coordinates to whole pixels or worse, which ties or reorders the
    IoUs that ISR-P ranks. Decoding in float32 keeps the ranking of the float model.
    """
    pred = box_coder.decode_single(deltas.detach().float(), boxes.detach().float())
    return aligned_box_iou(pred, gt_boxes.detach().float())


def mean_over_workers(count: int, device: torch.device) -> Tensor:
    """`count` averaged over the data-parallel workers (1 without a process group), at least 1.

    The reference's single-stage normaliser: the positives of the whole batch, so that
    every positive weighs the same whichever image it is in.
    """
    import torch.distributed as dist

    value = torch.tensor(float(count), device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value.clamp(min=1.0)


class AnchorPositives:
    """The foreground anchors of a batch, flattened: which image, which anchor, which GT.

    `gt_inds` index the concatenation of all images' GTs, so they are unique across the
    batch as IoU-HLR requires.
    """

    def __init__(self, targets: list[dict[str, Tensor]], matched_idxs: list[Tensor]):
        matched = torch.stack(matched_idxs)  # (N, A)
        self.matched = matched
        self.mask = matched >= 0
        self.img_idx, self.anchor_idx = self.mask.nonzero(as_tuple=True)
        counts = torch.tensor([len(t["boxes"]) for t in targets], device=matched.device)
        offsets = torch.cumsum(counts, 0) - counts
        self.gt_inds = offsets[self.img_idx] + matched[self.img_idx, self.anchor_idx]
        all_boxes = torch.cat([t["boxes"] for t in targets])
        all_labels = torch.cat([t["labels"] for t in targets])
        self.gt_boxes = all_boxes[self.gt_inds]
        self.labels = all_labels[self.gt_inds].long()

    def __len__(self) -> int:
        return int(self.img_idx.numel())

    def select(self, per_anchor: Tensor) -> Tensor:
        """Rows of a (N, A, ...) tensor at the positives."""
        return per_anchor[self.img_idx, self.anchor_idx]


@dataclass
class PisaDiagnostics:
    """The last training step's PISA tensors (detached, on the model's device).

    Same names for every detector; a field is None where the step had nothing for it
    (no positives, a part switched off, a single-stage model without a RoI sampler).
    """

    # ISR-P, per positive
    ious: Tensor | None = None  # IoU of the decoded box with its GT
    labels: Tensor | None = None  # GT class
    gt_inds: Tensor | None = None  # GT index, unique across the batch
    cls_loss: Tensor | None = None  # unweighted classification loss
    iou_hlr: Tensor | None = None  # IoU hierarchical local rank (0 = most important)
    isr_p_weights: Tensor | None = None
    # CARL, per positive
    carl_weights: Tensor | None = None
    # ISR-N, per sampled negative (two-stage, Score-HLR sampler)
    isr_n_weights: Tensor | None = None
    num_pos: Tensor | None = None  # positives in the batch (this worker)
    # RoI sampling (two-stage samplers that rank all proposals)
    roi_loss: Tensor | None = None  # per proposal (+ GT), concatenated over images
    roi_labels: Tensor | None = None
    num_proposals: Tensor | None = None  # per image
    sampled_inds: Tensor | None = None  # into the concatenated proposals
    num_sampled: Tensor | None = None  # per image

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


class PisaLoss(nn.Module):
    """ISR-P and CARL for a head's positives, plus the step's diagnostics record.

    A module without parameters (nothing enters checkpoints), so that
    `collect_diagnostics(model)` finds it wherever the head sits.
    """

    def __init__(self, isr_p: ISRPConfig | None = None, carl: CARLConfig | None = None, diagnostics: bool = True):
        super().__init__()
        self.isr_p = isr_p or ISRPConfig()
        self.carl = carl or CARLConfig()
        self.diagnostics = diagnostics
        self._record = PisaDiagnostics()
        self._masked: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def record(self) -> PisaDiagnostics:
        """This step's record; values noted with a mask are selected now, when read (one
        host sync per logging interval instead of one per step)."""
        for name, (value, mask) in self._masked.items():
            setattr(self._record, name, value[mask])
        self._masked.clear()
        return self._record

    @record.setter
    def record(self, value: PisaDiagnostics) -> None:
        self._record = value
        self._masked.clear()

    def start_step(self) -> PisaDiagnostics:
        """A fresh record for this step (kept empty when diagnostics are off)."""
        self.record = PisaDiagnostics()
        return self._record

    def note(self, **values: Tensor) -> None:
        """Keep detached copies of `values` in this step's record (no device transfer)."""
        if self.diagnostics:
            for name, value in values.items():
                self._masked.pop(name, None)
                setattr(self._record, name, value.detach())

    def note_masked(self, mask: Tensor, **values: Tensor) -> None:
        """Keep `values[mask]` in the record, selected only when the record is read: fixed-size
        slots need no variable-size selection (a host sync) in the step itself."""
        if self.diagnostics:
            for name, value in values.items():
                self._masked[name] = (value.detach(), mask.detach())

    def positive_weights(
        self,
        box_coder: BoxCoder,
        deltas: Tensor,
        boxes: Tensor,
        gt_boxes: Tensor,
        labels: Tensor,
        gt_inds: Tensor,
        cls_loss: Tensor,
        valid: Tensor | None = None,
    ) -> Tensor | None:
        """ISR-P importance weights of the positives, or None when ISR-P is off or there are none.

        Per positive: predicted `deltas` on its anchor/proposal `boxes`, its GT box, class
        and batch-unique GT index, and its unweighted classification loss ((P,) or (P, C),
        summed over classes). The weights keep the positives' total of that loss unchanged.
        With `valid`, the rows are fixed-size slots and `valid` marks the positives among them
        (weights 1 elsewhere): the same weights, without selecting the positives.
        """
        if valid is None:
            self.note(num_pos=torch.tensor(labels.numel(), device=labels.device))
        else:
            self.note(num_pos=valid.sum())
        if not self.isr_p.enabled or labels.numel() == 0:
            return None
        ious = decoded_ious(box_coder, deltas, boxes, gt_boxes)
        loss = cls_loss.detach().float()
        if loss.dim() > 1:
            loss = loss.sum(dim=tuple(range(1, loss.dim())))
        if valid is None:
            hlr = iou_hlr(ious, labels, gt_inds)
            weights = isr_p_weights(ious, labels, gt_inds, loss, k=self.isr_p.k, bias=self.isr_p.bias, hlr=hlr)
            self.note(ious=ious, labels=labels, gt_inds=gt_inds, cls_loss=loss, iou_hlr=hlr, isr_p_weights=weights)
            return weights
        groups, gts = mask_groups(labels, valid), mask_groups(gt_inds, valid)
        hlr = iou_hlr(ious, groups, gts)
        weights = isr_p_weights(ious, groups, gts, loss, k=self.isr_p.k, bias=self.isr_p.bias, hlr=hlr, valid=valid)
        self.note_masked(
            valid, ious=ious, labels=labels, gt_inds=gt_inds, cls_loss=loss, iou_hlr=hlr, isr_p_weights=weights
        )
        return weights

    def carl_term(
        self, cls_prob: Tensor, reg_loss: Tensor, avg_factor: float | Tensor, valid: Tensor | None = None
    ) -> Tensor | None:
        """CARL loss of the positives (`cls_prob` of their GT class, `reg_loss` (P, 4)), or None when off.

        With `valid`, rows are fixed-size slots and `valid` marks the positives among them."""
        if not self.carl.enabled:
            return None
        cls_prob = cls_prob.float()
        k, bias = self.carl.k, self.carl.bias
        if valid is not None:
            self.note_masked(valid, carl_weights=carl_weights(cls_prob.detach(), k=k, bias=bias, valid=valid))
        elif cls_prob.numel() > 0:
            self.note(carl_weights=carl_weights(cls_prob, k=k, bias=bias))
        return carl_loss(cls_prob, reg_loss.float(), k=k, bias=bias, avg_factor=avg_factor, valid=valid)


def collect_diagnostics(model: nn.Module) -> dict[str, Tensor]:
    """The last step's diagnostics of every `PisaLoss` in `model`, still on its device."""
    merged: dict[str, Tensor] = {}
    for module in model.modules():
        if isinstance(module, PisaLoss) and module.diagnostics:
            merged.update(module.record.as_dict())
    return merged


class DiagnosticsMixin:
    """Gives a detector `pisa_diagnostics()`: its PISA record of the last training step."""

    def pisa_diagnostics(self) -> dict[str, Tensor]:
        return collect_diagnostics(self)  # type: ignore[arg-type]
