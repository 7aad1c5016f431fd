"""A few timed training steps of one config on this machine: the throughput a study plan
prices its trials with when no earlier run of the same model says it.

One worker's step (forward, backward, SGD update) on one batch of the config's training
set, with the device plan a training uses (autocast, channels_last), repeated after an
untimed warm-up. Then a few inference passes over the same images estimate the evaluation (the detector's
forward only: COCOeval's own time is not in it). Data loading and the workers' gradient
all-reduce are not measured: a probe answers "how fast does this model train here", in
seconds, not a benchmark.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

from ..core.config import ExperimentConfig


@dataclass(frozen=True)
class ProbeResult:
    """What a probe measured: one worker's images per second on `device`."""

    images_per_sec: float
    device: str  # "cpu" or "cuda" (with the GPU's name when there is one)
    steps: int  # timed steps
    step_s: float  # their median
    threads: int  # torch's CPU threads during the probe
    eval_image_s: float  # inference seconds per image (median pass / batch)
    val_images: int  # the val set after `data.val_limit`


def probe_rate(cfg: ExperimentConfig, *, warmup: int = 2, steps: int = 5, max_seconds: float = 10.0) -> ProbeResult:
    """Time `steps` training steps of `cfg`'s model on one batch of `train.images_per_worker`
    images, after `warmup` untimed ones; stop timing early past `max_seconds` (at least one
    timed step). CPU steps use `cpus_per_worker` threads, as a Ray worker of it does."""
    import torch

    from ..data import build_dataset, collate_fn  # torchvision, pycocotools: only when probing
    from ..models import build_detector
    from .device_plan import apply_channels_last, make_grad_scaler, optimizer_step, plan_for

    cuda = cfg.train.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    threads_before = torch.get_num_threads()
    threads = threads_before if cuda else max(1, int(cfg.train.cpus_per_worker))
    data = build_dataset(cfg.data, "train", train=True, with_masks=cfg.model.detector == "mask_rcnn")
    val_images = len(build_dataset(cfg.data, "val", train=False))
    size = cfg.train.images_per_worker
    images, targets = collate_fn([data[i % len(data)] for i in range(size)])
    images = [img.to(device) for img in images]
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    # the weights do not change a step's time: none are loaded
    model_cfg = cfg.model.model_copy(update={"pretrained_backbone": None})
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.train.seed)
        model = build_detector(model_cfg, num_classes=data.num_classes).to(device).train()
        plan = plan_for(cfg.train, device.type, 1)
        if plan.channels_last:
            model = apply_channels_last(model)
        # a tiny LR: the weights stay near their start, so no step is slowed by a diverging loss
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
        scaler = make_grad_scaler(plan)

        def step() -> float:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=plan.autocast_dtype, enabled=plan.amp):
                losses = model(images, targets)
            optimizer_step(sum(losses.values()), model, optimizer, scaler, cfg.train.grad_clip)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start

        for _ in range(warmup):
            step()
        times: list[float] = []
        began = time.perf_counter()
        while len(times) < max(1, steps) and (not times or time.perf_counter() - began < max_seconds):
            times.append(step())

        model.eval()
        passes: list[float] = []
        with torch.no_grad(), torch.autocast(device.type, dtype=plan.autocast_dtype, enabled=plan.amp):
            for _ in range(1 + min(2, max(1, steps))):  # the first is a warm-up
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(images)
                if cuda:
                    torch.cuda.synchronize()
                passes.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads_before)
    median = statistics.median(times)
    rate = size / median if median > 0 else math.inf
    where = f"cuda ({torch.cuda.get_device_name(device)})" if cuda else "cpu"
    return ProbeResult(
        images_per_sec=rate,
        device=where,
        steps=len(times),
        step_s=median,
        threads=threads,
        eval_image_s=statistics.median(passes[1:]) / size,
        val_images=val_images,
    )
