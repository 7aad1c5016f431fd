"""The per-worker training loop: on every Ray Train worker, or in a 1-worker Tune trial.

One epoch = train on this worker's shard, evaluate the val set (sharded, gathered,
COCOeval on rank 0, broadcast), then report the metrics (`pisa.core.epoch_report.EpochReport`)
with a checkpoint (model, optimizer, scheduler, scaler, epoch, config and the class names: the
format of `pisa.core.checkpoint`). The data order (a DistributedSampler seeded from
`train.seed` and the epoch) and each image's augmentation and anchor/RoI draws (seeded from
`train.seed`, the epoch and the image: `pisa.data.draws`) are set at every epoch start, so a
run resumed from the epoch-N checkpoint continues exactly like the uninterrupted run, and the
layouts of one global batch (1 worker x 4 images, 2 x 2, 4 x 1) train alike
(tests/test_layouts.py).
Device choices (AMP dtype, GradScaler, channels_last, SyncBatchNorm) come from
`pisa.training.device_plan.plan_for`, the same code on CPU and GPU.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..core.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from ..core.config import ExperimentConfig
from ..core.epoch_report import EpochCounters, EpochReport, epoch_report, with_metrics
from ..core.errors import NonFiniteLossError
from ..core.progress import say
from ..core.schedule import Schedule, lr_factor
from .collectives import all_reduce_mean, unwrap
from .device_plan import (
    DevicePlan,
    apply_channels_last,
    convert_sync_batchnorm,
    make_grad_scaler,
    optimizer_step,
    plan_for,
)
from .epoch_eval import evaluate
from .faults import Faults, from_config
from .loaders import (
    batch_to_device,
    build_train_loader,
    build_train_set,
    build_val_set,
    epoch_seed,
    seed_everything,
    seed_loader_for_epoch,
)
from .loss_tally import LossTally
from .ray_runtime import quiet_ray_train_worker
from .session import RayTrainSession, TrainSession

if TYPE_CHECKING:
    from ..models.pisa_loss import DiagnosticsMixin

DIAGNOSTICS_FILE = "diagnostics.pt"
MAX_DIAGNOSTIC_VALUES = 50_000


# ---------------------------------------------------------------- optimizer


def build_optimizer(model: nn.Module, schedule: Schedule) -> torch.optim.Optimizer:
    """SGD as in the paper: weight decay on every parameter with `decay_norm_and_bias`
    (mmdetection's), else none on norms and biases."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 and not schedule.decay_norm_and_bias else decay).append(p)
    # fused: one kernel for all parameters, and it takes the step's non-finite flag on the
    # device (`found_inf`), so a skipped step needs no host read (see `_train_epoch`)
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": schedule.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=schedule.scaled_lr,
        momentum=schedule.momentum,
        fused=fused,
    )


# ---------------------------------------------------------------- helpers


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _read_diagnostics(model: nn.Module, into: dict[str, list[torch.Tensor]]) -> None:
    """Append the last step's float PISA diagnostics (on the device) to `into`, on the CPU."""
    for k, v in cast("DiagnosticsMixin", unwrap(model)).pisa_diagnostics().items():
        if v.is_floating_point() and sum(x.numel() for x in into[k]) < MAX_DIAGNOSTIC_VALUES:
            into[k].append(v.float().flatten().cpu())


# ---------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict[str, Any]) -> str | None:
    """Ray Train entry point; `config["experiment"]` is an `ExperimentConfig` dump. Returns
    the error the training stopped on without a restart (`Result.return_value`), if any."""
    if config.get("quiet"):
        quiet_ray_train_worker()
    return run_worker(config, RayTrainSession())


@dataclass
class Training:
    """What one worker trains with; a checkpoint holds its state."""

    cfg: ExperimentConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Any
    loader: Any
    val_set: Any
    device: torch.device
    plan: DevicePlan
    rank: int
    world: int
    epochs: int
    class_names: list[str]  # the training set's categories, in the model's label order 1..C
    category_ids: list[int]  # their COCO ids
    iteration: int = 0  # global, across epochs
    faults: Faults = field(default_factory=Faults)  # a test's (`pisa.training.faults`), else none
    observe_loss: Callable[[torch.Tensor, int], None] | None = None


@dataclass
class _EpochStats:
    sums: dict[str, float]
    steps: int
    images: int
    seconds: float
    diagnostics: dict[str, list[torch.Tensor]]


def run_worker(
    config: dict[str, Any], session: TrainSession, observe_loss: Callable[[torch.Tensor, int], None] | None = None
) -> str | None:
    """One worker's training: on a Ray Train worker or in a Tune trial's own process.

    A non-finite loss is deterministic: a restart from the last checkpoint would diverge at
    the same step again. Every worker sees it at the same step (`LossTally`) and the
    session ends the training without a restart (`TrainSession.stop_on`): a Ray Train
    worker returns its message, which Ray Train would otherwise retry as a failure."""
    t = build_training(ExperimentConfig.model_validate(config["experiment"]), session)
    t.faults = from_config(config.get("faults"))  # a test's, else none
    t.observe_loss = observe_loss  # a benchmark's record of every step's loss
    start_epoch = _restore(t, session, config.get("resume_from"))
    try:
        for epoch in range(start_epoch, t.epochs):
            stats = _train_epoch(t, session, epoch)
            metrics = _evaluate_epoch(t, epoch, stats)
            _report(t, session, epoch, metrics, stats.diagnostics)
    except NonFiniteLossError as exc:
        session.stop_on(exc)
        return str(exc)
    return None


def stopped_on(result: Any) -> NonFiniteLossError | None:
    """The error a Ray Train run ended on without a restart (its return value), if any."""
    message = getattr(result, "return_value", None)
    return NonFiniteLossError(message) if isinstance(message, str) else None


def _non_finite(epoch: int, step: int, first_iteration: int, where: str) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"non-finite loss at epoch {epoch + 1} iteration {step + 1} "
        f"(global {first_iteration + step}): {where}; lower the LR (train.lr) or enable train.grad_clip"
    )


def _frozen_norms_only(model: nn.Module) -> bool:
    """No norm layer with running statistics: DDP need not broadcast buffers every step
    (frozen BN's and GroupNorm's never change)."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def build_training(cfg: ExperimentConfig, session: TrainSession, announce: bool = True) -> Training:
    """Everything one worker trains with, as a training builds it (the rate probe times the
    same build and step, so its set-up cannot drift from the training's)."""
    # torchvision's detectors and pycocotools: loaded where a worker trains, not by a driver
    # that imports this module for `train_loop_per_worker`
    from ..models import build_detector

    rank, world = session.rank, session.world_size
    device = session.device()
    plan = plan_for(cfg.train, device.type, world, fixed_size=cfg.model.fixed_size)
    torch.backends.cudnn.benchmark = plan.cudnn_benchmark
    seed_everything(cfg.train.seed)

    train_set = build_train_set(cfg)
    val_set = build_val_set(cfg)
    model = build_detector(cfg.model, num_classes=train_set.num_classes)
    if plan.sync_batchnorm:
        model = convert_sync_batchnorm(model)
    if plan.channels_last:
        model = apply_channels_last(model)
    schedule = cfg.train.resolved()  # world == cfg.train.workers: the LR is scaled for it

    # every parameter gets a gradient in every step: Mask R-CNN's mask loss is 0 x the mask
    # head's output when a batch has no positives (tests/test_models_two_stage.py)
    model = session.prepare_model(model, find_unused_parameters=False, broadcast_buffers=not _frozen_norms_only(model))
    optimizer = build_optimizer(model, schedule)
    loader = build_train_loader(train_set, cfg, rank, world, plan)
    iters_per_epoch = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, iters_per_epoch, schedule))
    if plan.grad_scaler:
        # the scaler skips the first steps while it finds its scale (fp16 gradients overflow);
        # the schedule advances regardless, as mmdetection's does: torch's warning is expected
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
    if rank == 0 and announce:
        say(
            f"{cfg.model.detector}/{cfg.model.backbone} sampler={cfg.model.sampler} "
            f"isr_p={cfg.model.isr_p.enabled} carl={cfg.model.carl.enabled}: {len(train_set)} train / "
            f"{len(val_set)} val images, {world} worker(s) x {cfg.train.images_per_worker} img, "
            f"lr {schedule.scaled_lr:.4g}, {schedule.epochs} epochs x {iters_per_epoch} iters on {device} "
            f"(amp {plan.autocast_dtype or 'off'}, channels_last {plan.channels_last}, "
            f"sync BN {plan.sync_batchnorm}, {cfg.data.num_workers} loader workers)"
        )
    return Training(
        cfg,
        model,
        optimizer,
        scheduler,
        make_grad_scaler(plan),
        loader,
        val_set,
        device,
        plan,
        rank,
        world,
        schedule.epochs,
        list(train_set.cat_names),
        [int(train_set.label_to_cat_id[label]) for label in range(1, train_set.num_classes + 1)],
    )


def save_checkpoint(directory: Path, t: Training, epoch: int, metrics: EpochReport) -> Path:
    """`t`'s state after epoch index `epoch` as a checkpoint in `directory` (the format is
    `pisa.core.checkpoint`'s): weights, optimizer, scheduler, scaler, counters, config, classes."""
    payload = Checkpoint(
        model=unwrap(t.model).state_dict(),
        optimizer=t.optimizer.state_dict(),
        scheduler=t.scheduler.state_dict(),
        scaler=t.scaler.state_dict() if t.scaler is not None else {},
        epoch=epoch,
        iteration=t.iteration,
        config=t.cfg,
        class_names=t.class_names,
        category_ids=t.category_ids,
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
    )
    return write_checkpoint(directory, payload)


def _restore(t: Training, session: TrainSession, resume_from: str | None) -> int:
    """The epoch to start at: after the session's checkpoint (a restarted worker or trial),
    else after `resume_from`'s, else 0."""
    state = None
    with session.restored_checkpoint() as restored:
        if restored is not None:
            state = read_checkpoint(restored)
    if state is None and resume_from:
        state = read_checkpoint(resume_from)
    if state is None:
        return 0
    unwrap(t.model).load_state_dict(state.model)
    t.optimizer.load_state_dict(state.optimizer)
    t.scheduler.load_state_dict(state.scheduler)
    if t.scaler is not None and state.scaler:
        t.scaler.load_state_dict(state.scaler)
    start_epoch, t.iteration = state.epoch + 1, state.iteration
    if t.rank == 0:
        say(f"resumed from epoch {start_epoch} (iteration {t.iteration})")
    return start_epoch


def _train_epoch(t: Training, session: TrainSession, epoch: int) -> _EpochStats:
    """One epoch on this worker's shard. The host reads the device only every `log_every`
    steps and at the end (`LossTally`); a non-finite step updates nothing (the fused SGD
    skips it on the device), and the training stops at the next read with its message."""
    cfg, rank = t.cfg, t.rank
    seed_everything(epoch_seed(cfg.train.seed, epoch, rank))
    seed_loader_for_epoch(t.loader, cfg.train.seed, epoch, rank)
    t.model.train()
    iters_per_epoch = len(t.loader)
    stats = _EpochStats(defaultdict(float), 0, 0, 0.0, defaultdict(list))
    tally = LossTally(t.device)
    first_iteration = t.iteration
    t_epoch = time.perf_counter()
    for step, (images, targets) in enumerate(t.loader):
        t.faults.at_step(epoch, step, t.rank)
        try:
            train_step(t, tally, images, targets, step)
        except NonFiniteLossError:
            raise
        except Exception:  # after a non-finite step, an op may fail on NaN first
            _check_finite(tally, epoch, first_iteration)
            raise
        stats.steps += 1
        stats.images += len(images)
        logs_now = (step + 1) % cfg.train.log_every == 0
        if not logs_now:
            continue
        sums = _check_finite(tally, epoch, first_iteration)
        if rank != 0:
            continue
        if cfg.model.diagnostics:
            _read_diagnostics(t.model, stats.diagnostics)
        elapsed = time.perf_counter() - t_epoch
        remaining = (iters_per_epoch - step - 1) + (t.epochs - epoch - 1) * iters_per_epoch
        say(
            f"epoch {epoch + 1}/{t.epochs} iter {step + 1}/{iters_per_epoch} "
            f"loss {sums.get('loss', float('nan')) / stats.steps:.4f} lr {t.optimizer.param_groups[0]['lr']:.4g} "
            f"{stats.images * t.world / elapsed:.1f} img/s eta {_fmt_eta(elapsed / (step + 1) * remaining)}"
        )
    stats.sums.update(_check_finite(tally, epoch, first_iteration))
    if rank == 0 and cfg.model.diagnostics and stats.steps % cfg.train.log_every != 0:
        _read_diagnostics(t.model, stats.diagnostics)  # the epoch's last steps, once
    stats.seconds = time.perf_counter() - t_epoch
    return stats


def train_step(t: Training, tally: LossTally, images, targets, step: int) -> None:
    """Forward, backward and update, without a host read."""
    images, targets = batch_to_device(images, targets, t.device)
    with torch.autocast(t.device.type, dtype=t.plan.autocast_dtype, enabled=t.plan.amp):
        losses = t.model(images, targets)
    loss = t.faults.poisoned(sum(losses.values()), t.iteration, t.rank)
    if t.observe_loss is not None:
        t.observe_loss(loss, t.iteration)
    finite = tally.add(loss, losses, step)
    if getattr(t.optimizer, "_step_supports_amp_scaling", False) and t.scaler is None:
        t.optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]  # fused SGD skips on the device
    optimizer_step(loss, t.model, t.optimizer, t.scaler, t.cfg.train.grad_clip)
    t.scheduler.step()
    t.iteration += 1


def _check_finite(tally: LossTally, epoch: int, first_iteration: int) -> dict[str, float]:
    """The tally's sums, or the error of its first non-finite step on any worker."""
    sums, bad_step, mine = tally.read()
    if bad_step is not None:
        where = tally.bad_detail() if mine else "on another worker"
        raise _non_finite(epoch, bad_step, first_iteration, where)
    return sums


def _evaluate_epoch(t: Training, epoch: int, stats: _EpochStats) -> EpochReport:
    """The epoch's report, the same on every rank: mean training losses over the workers,
    the val set's COCO AP, and the epoch's throughput."""
    steps = max(1, stats.steps)
    losses = all_reduce_mean({f"train_{k}": v / steps for k, v in stats.sums.items()})
    iou_types = ("bbox", "segm") if t.cfg.model.has_masks else ("bbox",)
    t_eval = time.perf_counter()
    coco = evaluate(t.model, t.val_set, t.device, t.rank, t.world, t.cfg.train.images_per_worker, iou_types)
    counters = EpochCounters(
        epoch=epoch + 1,
        iteration=t.iteration,
        lr=t.optimizer.param_groups[0]["lr"],
        images_per_sec=stats.images * t.world / max(stats.seconds, 1e-9),
        time_train_s=stats.seconds,
        time_eval_s=time.perf_counter() - t_eval,
    )
    return epoch_report(counters, losses, coco)


def _report(
    t: Training,
    session: TrainSession,
    epoch: int,
    metrics: EpochReport,
    diagnostics: dict[str, list[torch.Tensor]],
) -> None:
    """Rank 0 reports with a checkpoint (and the PISA weight samples), the others without."""
    diag = {k: torch.cat(v) for k, v in diagnostics.items() if v}
    weights: dict[str, float] = {}
    for k, v in diag.items():
        weights[f"pisa_{k}_mean"] = float(v.mean())
        weights[f"pisa_{k}_max"] = float(v.max())
    metrics = with_metrics(metrics, weights)
    if t.rank != 0:
        session.report(metrics, None)
        return
    say(
        f"epoch {epoch + 1}/{t.epochs} done: loss {metrics.get('train_loss', float('nan')):.4f} "
        f"bbox_mAP {metrics.get('bbox_mAP', 0.0):.4f} ({metrics['time_train_s']:.1f}s train)"
    )
    with tempfile.TemporaryDirectory(prefix="pisa-ckpt-") as tmp:
        save_checkpoint(Path(tmp), t, epoch, metrics)
        if diag:
            torch.save(diag, Path(tmp) / DIAGNOSTICS_FILE)
        session.report(metrics, Path(tmp))
