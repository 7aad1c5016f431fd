"""What the loop needs of DDP beyond its gradients: the bare model, and a broadcast and a mean
across workers (no-ops in a process that trains alone)."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn


def broadcast_object(obj: Any) -> Any:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP's wrapper (or `model` itself): what is saved, loaded and evaluated."""
    return cast(nn.Module, model.module) if hasattr(model, "module") else model
