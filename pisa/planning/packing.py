"""Packing a study's trials onto fewer GPUs (`resources_per_trial.pack: auto`).

The paper's recipe fixes the total batch and the learning rate, not the number of GPUs: with
normalisation that does not depend on how the batch is split (frozen BN, GroupNorm, BN
synchronised over the workers), 8 GPUs x 2 images, 2 x 8 and 1 x 16 are the same optimisation
up to floating point, since DDP averages the workers' gradients and the LR is scaled by the
total batch only (`pisa.core.schedule.Schedule.scaled_lr`). So a trial may use the fewest GPUs
whose memory holds its share of the batch, and one node runs several trials at once.

The arithmetic here is pure: where the memory figures come from (the study file, a probe on
the GPU) is `pisa.search.study`'s business.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from ..core.config import ModelConfig

USABLE_FRACTION = 0.9  # of a card's memory a worker may plan for: the allocator's fragmentation, NCCL's buffers
# What a training worker holds besides its images' activations when no probe measured it: the
# weights, gradients and SGD momentum of an detector (under 1 GiB), DDP's gradient
# buckets, the CUDA context and cuDNN/cuBLAS workspaces.
WORKER_OVERHEAD_GIB = 2.0


@dataclass(frozen=True)
class Layout:
    """How one trial's training splits its batch: workers x images per worker."""

    workers: int
    images_per_worker: int
    gpus_per_worker: float  # 0: CPU workers

    @property
    def batch(self) -> int:
        return self.workers * self.images_per_worker

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    def text(self) -> str:
        """`8 worker(s) x 2 images on 8 GPU(s)`."""
        where = f" on {self.gpus:g} GPU(s)" if self.gpus_per_worker else " on CPUs"
        return f"{self.workers} worker(s) x {self.images_per_worker} images{where}"


@dataclass(frozen=True)
class GpuMemory:
    """One card's memory and what a worker needs on it: a fixed part plus a part per image."""

    card_gib: float
    per_image_gib: float
    overhead_gib: float
    source: str  # "gpu_mem_per_image_gib", "a probe on cuda (NVIDIA H200)"

    def need_gib(self, images: int) -> float:
        return self.overhead_gib + images * self.per_image_gib

    def usable_gib(self, gpus_per_worker: float) -> float:
        """What one worker may plan for: its share of a card (a fraction shares one), less a margin."""
        return USABLE_FRACTION * self.card_gib * min(gpus_per_worker, 1.0)


@dataclass(frozen=True)
class Packing:
    """The layout a study's trials train with, the one it was given, and why."""

    given: Layout
    chosen: Layout
    trials_per_node: int  # trials of the chosen layout on the GPUs one given trial holds
    reason: str

    @property
    def packed(self) -> bool:
        return self.chosen != self.given

    def line(self) -> str:
        """The one line `pisa study run` prints and the plan notes."""
        if not self.packed:
            return f"trial layout {self.given.text()} kept: {self.reason}"
        return (
            f"trial layout {self.chosen.text()} instead of {self.given.text()} "
            f"({self.trials_per_node} trials on those {self.given.gpus:g} GPUs): {self.reason}"
        )


def effective_norm(model: ModelConfig) -> str:
    """`model.norm` with `auto` resolved as the backbone builder resolves it
    (`pisa.models.backbones.resolve_norm`, which needs torch): frozen BN with pretrained
    weights, trainable BN from scratch."""
    if model.norm == "auto":
        return "frozen_bn" if model.pretrained_backbone else "bn"
    return model.norm


def layout_free_norm(model: ModelConfig, sync_bn: bool) -> tuple[bool, str]:
    """Whether the model normalises the same way however the batch is split, and why (not)."""
    if model.fixed_size:
        return True, "VGG16 has no normalisation layers"
    norm = effective_norm(model)
    if norm == "frozen_bn":
        return True, "frozen BN keeps no batch statistics"
    if norm == "gn":
        return True, "GroupNorm normalises each image on its own"
    if sync_bn:
        return True, "trainable BN synchronised over the workers (train.sync_bn) normalises over the whole batch"
    return False, (
        f"trainable BN (model.norm: {model.norm}, train.sync_bn: false) normalises over each worker's images, "
        "so another split of the batch trains differently; set workers and images_per_worker to change it"
    )


def per_worker_losses(model: ModelConfig, searched: Collection[str] = ()) -> list[str]:
    """The losses normalised over one worker's images (mmdetection: one GPU's), which a packed
    layout normalises over more images at a time: on in the base config or switched on by the search."""
    switches = (
        ("ISR-P", model.isr_p.enabled, "model.isr_p.enabled"),
        ("CARL", model.carl.enabled, "model.carl.enabled"),
    )
    parts = [name for name, on, key in switches if on or key in searched]
    if model.fixed_size:
        parts.append("SSD's loss (by the positives of the batch)")
    return parts


def keep(given: Layout, reason: str, node_gpus: float | None = None) -> Packing:
    """The given layout, unchanged, and why."""
    node = given.gpus if node_gpus is None else node_gpus
    return Packing(given, given, _trials_on(node, given), reason)


def pack(
    given: Layout,
    memory: GpuMemory,
    *,
    why_equivalent: str = "",
    per_worker: list[str] | None = None,
    node_gpus: float | None = None,
) -> Packing:
    """The fewest GPUs per trial whose memory holds the batch: g workers, a divisor of the total
    batch and at most the given workers, each with batch/g images; the total batch (and so the
    scaled LR) stays. `node_gpus` (default: the GPUs of one given trial) counts trials per node."""
    batch, usable = given.batch, memory.usable_gib(given.gpus_per_worker)
    fitting = [g for g in _divisors(batch) if g <= given.workers and memory.need_gib(batch // g) <= usable]
    figures = (
        f"{_gib(memory.per_image_gib)} GiB/image from {memory.source}, {_gib(memory.overhead_gib)} GiB per worker, "
        f"{_gib(usable)} of {_gib(memory.card_gib)} GiB usable per worker"
    )
    if not fitting:
        need = memory.need_gib(given.images_per_worker)
        return keep(
            given, f"even {given.images_per_worker} images per worker need ~{_gib(need)} GiB ({figures})", node_gpus
        )
    workers = fitting[0]
    if workers == given.workers:
        fewer = [g for g in _divisors(batch) if g < given.workers]
        if not fewer:
            return keep(given, "one worker already", node_gpus)
        more = batch // fewer[-1]
        need = memory.need_gib(more)
        return keep(given, f"{more} images per worker would need ~{_gib(need)} GiB ({figures})", node_gpus)
    chosen = Layout(workers, batch // workers, given.gpus_per_worker)
    reason = (
        f"{chosen.images_per_worker} images per worker need ~{_gib(memory.need_gib(chosen.images_per_worker))} GiB "
        f"({figures}); the same batch of {batch} and learning rate"
        + (f", and {why_equivalent}: the same optimisation up to floating point" if why_equivalent else "")
    )
    if per_worker:
        names = " and ".join(filter(None, [", ".join(per_worker[:-1]), per_worker[-1]]))
        reason += (
            f"; {names} normalise{'s' if len(per_worker) == 1 else ''} over a worker's "
            f"{chosen.images_per_worker} images instead of "
            f"{given.images_per_worker}: the same in expectation, not step for step"
        )
    node = given.gpus if node_gpus is None else node_gpus
    return Packing(given, chosen, _trials_on(node, chosen), reason)


def _gib(value: float) -> str:
    """GiB to three digits: 127 of 141, 10.8 of 12 (not 11 of 12)."""
    return f"{value:.3g}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _trials_on(gpus: float, layout: Layout) -> int:
    """Trials of `layout` that `gpus` GPUs hold (rounded so that 8 x 0.1 fits 0.8)."""
    if layout.gpus <= 0:
        return 1
    return int(round(gpus / layout.gpus, 9))
