"""A few timed training steps of one config on this machine: the throughput a study plan
prices its trials with when no earlier run of the same model says it.

One worker's step (forward, backward, SGD update) on one batch of the config's training
set, with the device plan a training uses (autocast, channels_last), repeated after an
untimed warm-up. Then a few inference passes over the same images estimate the evaluation (the detector's
forward only: COCOeval's own time is not in it). Data loading and the workers' gradient
all-reduce are not measured: a probe answers "how fast does this model train here", in
seconds, not a benchmark.

A memory probe (`probe_gpu_memory`, CUDA only) measures the peak GPU memory of the same step
at two batch sizes: the slope is the memory per image, the intercept what a worker holds
whatever its batch (weights, gradients, optimizer state, workspaces). `pack: auto` studies
choose their trials' layout from it (`pisa.planning.packing`).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

from ..core.config import ExperimentConfig

GIB = 2**30
# the CUDA context and its kernel images: held by every worker, outside torch's allocator
CUDA_CONTEXT_GIB = 0.5


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
    from .loaders import batch_to_device, build_train_set

    cuda = cfg.train.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    threads_before = torch.get_num_threads()
    threads = threads_before if cuda else max(1, int(cfg.train.cpus_per_worker))
    data = build_train_set(cfg)  # as a worker trains on it: SSD's images at its input size
    val_images = len(build_dataset(cfg.data, "val", train=False))
    size = cfg.train.images_per_worker
    images, targets = batch_to_device(*collate_fn([data[i % len(data)] for i in range(size)]), device)
    # the weights do not change a step's time: none are loaded
    unweighted = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained_backbone": None})})
    torch.set_num_threads(threads)
    try:
        trainer = _Trainer(unweighted, device)

        def step() -> float:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.step(images, targets)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start

        for _ in range(warmup):
            step()
        times: list[float] = []
        began = time.perf_counter()
        while len(times) < max(1, steps) and (not times or time.perf_counter() - began < max_seconds):
            times.append(step())

        model, plan = trainer.model.eval(), trainer.plan
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


class _ProbeSession:
    """A one-process `TrainSession` on `device` that reports nothing: a probe's steps are the
    engine's, outside any Ray session."""

    rank, world_size = 0, 1

    def __init__(self, device: Any) -> None:
        self._device = device

    def device(self) -> Any:
        return self._device

    def prepare_model(self, model: Any, find_unused_parameters: bool, broadcast_buffers: bool = True) -> Any:
        return model

    def report(self, metrics: Any, checkpoint_dir: Any) -> None:
        pass

    def restored_checkpoint(self) -> Any:
        import contextlib

        return contextlib.nullcontext(None)

    def stop_on(self, error: Exception) -> None:
        raise error


class _Trainer:
    """One worker's training as the engine builds it (`engine.build_training`: model, SGD,
    schedule, scaler, device plan with cuDNN autotuning and SSD's fixed size) and its step
    (`engine.train_step`): what the probe times is what a training runs."""

    def __init__(self, cfg: ExperimentConfig, device: Any):
        from .engine import build_training
        from .loss_tally import LossTally

        self.session = _ProbeSession(device)
        self.training = build_training(cfg, self.session, announce=False)
        self.tally = LossTally(device)
        self.model, self.plan, self.optimizer = self.training.model, self.training.plan, self.training.optimizer

    def step(self, images: list[Any], targets: list[dict[str, Any]]) -> None:
        from .engine import train_step

        train_step(self.training, self.tally, images, targets, 0)


# ---------------------------------------------------------------- GPU memory


@dataclass(frozen=True)
class MemoryProbe:
    """Peak GPU memory of one worker's training step as a line in its images: `overhead_gib`
    (weights, gradients, optimizer state, workspaces, the CUDA context) + images x `per_image_gib`."""

    per_image_gib: float | None  # None: the larger batch did not fit the card
    overhead_gib: float
    card_gib: float  # the card's total memory
    device: str  # "cuda (NVIDIA H200)"
    sizes: tuple[int, int]  # the batch sizes measured
    peaks_gib: tuple[float, ...]  # their peak memory (reserved by torch's allocator)


def local_gpu_gib() -> float | None:
    """The memory of this machine's first GPU, None without CUDA (checked only when asked:
    it imports torch)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


def probe_gpu_memory(cfg: ExperimentConfig, *, sizes: tuple[int, int] = (2, 4), steps: int = 2) -> MemoryProbe:
    """The peak memory of `steps` training steps of `cfg`'s model (its weights loaded: frozen
    layers keep no activations) at two batch sizes, after a warm-up step that allocates the
    optimizer state. Each batch mixes a landscape and a portrait copy of one val image at
    min_size x max_size, so the detector pads it to max_size x max_size: the largest input a
    worker's batch can have. Peaks are what torch's allocator reserved (fragmentation
    included; `torch.cuda.max_memory_reserved` after `torch.cuda.reset_peak_memory_stats`)."""
    import torch

    from ..data import build_dataset
    from .loaders import batch_to_device

    if not torch.cuda.is_available():
        raise RuntimeError("a GPU memory probe needs CUDA")
    device = torch.device("cuda", torch.cuda.current_device())
    data = build_dataset(cfg.data, "val", train=False, with_masks=cfg.model.has_masks)
    sample = next((data[i] for i in range(min(len(data), 50)) if len(data[i][1]["boxes"])), data[0])
    short, long = cfg.model.min_size, cfg.model.max_size
    pair = [_resized(*sample, (short, long)), _resized(*sample, (long, short))]
    peaks = _peaks(cfg, device, lambda n: batch_to_device(*_mixed(pair, n), device), sizes, steps)
    gc.collect()
    torch.cuda.empty_cache()  # the driver keeps no cache the trials' workers could use
    card = torch.cuda.get_device_properties(device).total_memory / GIB
    where = f"cuda ({torch.cuda.get_device_name(device)})"
    if len(peaks) < 2:
        return MemoryProbe(None, peaks[0] + CUDA_CONTEXT_GIB, card, where, sizes, tuple(peaks))
    slope = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
    if slope <= 0:  # allocator rounding hid the difference: charge everything to the images
        slope, intercept = peaks[1] / sizes[1], 0.0
    else:
        intercept = max(0.0, peaks[0] - sizes[0] * slope)
    return MemoryProbe(slope, intercept + CUDA_CONTEXT_GIB, card, where, sizes, tuple(peaks))


def _peaks(cfg: ExperimentConfig, device: Any, batch: Any, sizes: tuple[int, int], steps: int):
    """Peak reserved GiB per batch size; the list stops at the first size that runs out of memory
    (the tensors of the failed step go with this function's frame)."""
    import torch

    trainer = _Trainer(cfg, device)
    trainer.step(*batch(sizes[0]))  # warm-up: momentum buffers, cuDNN and cuBLAS workspaces
    peaks: list[float] = []
    for n in sizes:
        images, targets = batch(n)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            for _ in range(max(1, steps)):
                trainer.step(images, targets)
            torch.cuda.synchronize(device)
        except torch.OutOfMemoryError:
            if not peaks:
                raise
            break
        peaks.append(torch.cuda.max_memory_reserved(device) / GIB)
    trainer.optimizer.zero_grad(set_to_none=True)
    return peaks


def _mixed(pair: list[tuple[Any, dict[str, Any]]], n: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """`n` images alternating between the two of `pair`."""
    items = [pair[i % 2] for i in range(n)]
    return [img for img, _ in items], [dict(t) for _, t in items]


def _resized(image: Any, target: dict[str, Any], size: tuple[int, int]) -> tuple[Any, dict[str, Any]]:
    """`image` (C, H, W) and its target stretched to `size` (H, W): boxes and masks follow."""
    import torch
    import torch.nn.functional as F

    height, width = image.shape[-2:]
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    out = out if image.is_floating_point() else out.round().clamp(0, 255).to(image.dtype)
    sx, sy = size[1] / width, size[0] / height
    scaled = dict(target)
    scaled["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
    if "masks" in target and len(target["masks"]):
        masks = F.interpolate(target["masks"][None].float(), size=size, mode="nearest")[0]
        scaled["masks"] = masks.to(target["masks"].dtype)
    return out, scaled
