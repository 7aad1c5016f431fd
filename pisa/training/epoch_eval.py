"""Each epoch's COCO evaluation of the val set, sharded over the workers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .collectives import broadcast_object, unwrap


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset, device, rank: int, world: int, batch_size: int, iou_types: tuple[str, ...]
) -> dict[str, float]:
    """COCO metrics of the whole val set: each rank predicts a strided shard."""
    from ..evaluation import (  # pycocotools: where a worker evaluates
        encode_masks,
        evaluate_coco,
        gather_predictions,
        rescale_prediction,
    )

    net = unwrap(model)
    was_training = net.training
    net.eval()
    indices = list(range(rank, len(dataset), world))
    preds: list[dict[str, Any]] = []
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start : start + batch_size]]
        images = [img.to(device) for img, _ in items]
        outputs = net(images)
        for (image, target), out in zip(items, outputs):
            if "orig_size" in target:  # the loader resized the image (SSD's fixed input, max_size)
                out = rescale_prediction(out, image.shape[-2:], target["orig_size"].tolist())
            out = encode_masks(out)  # masks -> RLEs here, per batch: only RLEs are kept and gathered
            pred = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in out.items()}
            pred["image_id"] = int(target["image_id"])
            preds.append(pred)
    net.train(was_training)
    preds = gather_predictions(preds)
    metrics = None
    if rank == 0:
        image_ids = [int(dataset.ids[i]) for i in range(len(dataset))] if hasattr(dataset, "ids") else None
        metrics = evaluate_coco(dataset.coco, preds, dataset.label_to_cat_id, iou_types, image_ids=image_ids)
    return broadcast_object(metrics)
