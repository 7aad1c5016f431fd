"""Multi-scale RoIAlign with mmdetection 2.x's sampling: `aligned=True` and a free sampling ratio.

torchvision's `MultiScaleRoIAlign` always pools with `aligned=False` (Detectron's legacy
half-pixel offset and a 1-pixel minimum RoI); mmdetection 2.x's base configs pool with
`aligned=True` and `sampling_ratio=0`. The level mapping (FPN paper, canonical 224 px at P4)
is torchvision's, which equals mmdetection's `finest_scale=56` mapping.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

__all__ = ["AlignedMultiScaleRoIAlign"]


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's `MultiScaleRoIAlign` that pools with `aligned` as configured."""

    def __init__(
        self, featmap_names: list[str], output_size: int | tuple[int, int], sampling_ratio: int, aligned: bool
    ):
        super().__init__(featmap_names, output_size, sampling_ratio)
        self.aligned = aligned

    @classmethod
    def like(cls, pool: MultiScaleRoIAlign, sampling_ratio: int, aligned: bool) -> AlignedMultiScaleRoIAlign:
        """`pool`'s levels and output size with the given sampling."""
        return cls(list(pool.featmap_names), pool.output_size, sampling_ratio, aligned)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        maps = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:  # type: ignore[has-type]  # torchvision: untyped
            self.scales, self.map_levels = _setup_scales(maps, image_shapes, self.canonical_scale, self.canonical_level)
        scales: list[float] = self.scales
        rois = _convert_to_roi_format(boxes)
        if len(maps) == 1:
            return self._pool(maps[0], rois, scales[0])
        levels = self.map_levels(boxes)
        out = maps[0].new_zeros((rois.shape[0], maps[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(maps, scales)):
            idx = torch.where(levels == level)[0]
            out[idx] = self._pool(feature, rois[idx], scale).to(out.dtype)
        return out

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, aligned={self.aligned})"
