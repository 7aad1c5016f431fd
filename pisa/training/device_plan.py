"""How training uses the device: precision, memory format, norm sync, collectives.

Every choice is a pure function of the config, the device type and the world size, so
the decisions are unit-tested on a CPU and the code they switch on runs there too:
bfloat16 autocast and channels_last work on CPU, and fp16 + GradScaler is the same code
on either device. What cannot run on a CPU is said so where it is decided
(`use_sync_batchnorm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..core.config import TrainConfig

__all__ = [
    "DevicePlan",
    "apply_channels_last",
    "autocast_dtype",
    "convert_sync_batchnorm",
    "make_grad_scaler",
    "needs_grad_scaler",
    "optimizer_step",
    "plan_for",
    "process_group_backend",
    "use_sync_batchnorm",
]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DevicePlan:
    """The device-dependent switches of one training, decided once per worker."""

    device_type: str
    autocast_dtype: torch.dtype | None  # None: full fp32
    grad_scaler: bool
    channels_last: bool
    sync_batchnorm: bool
    pin_memory: bool
    cudnn_benchmark: bool = False  # autotuned convolutions: only when every batch has one size

    @property
    def amp(self) -> bool:
        return self.autocast_dtype is not None


def _enabled(value: bool | str, device_type: str) -> bool:
    """`auto` means on for CUDA, off elsewhere; a bool is taken as given."""
    return device_type == "cuda" if value == "auto" else bool(value)


def autocast_dtype(
    amp: bool | str, amp_dtype: str, device_type: str, bf16_supported: bool | None = None
) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. `auto` dtype: bfloat16 where the device has it
    (every CPU; GPUs from Ampere on: fp32's range, so no GradScaler and none of its host
    reads), fp16 on older GPUs (with a GradScaler). `bf16_supported` None: ask the device."""
    if not _enabled(amp, device_type):
        return None
    if amp_dtype == "auto":
        if device_type != "cuda":
            return torch.bfloat16
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if bf16_supported else torch.float16
    return _DTYPES[amp_dtype]


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """Only fp16 needs loss scaling: its 5-bit exponent underflows small gradients;
    bfloat16 has fp32's range."""
    return dtype == torch.float16


def use_sync_batchnorm(device_type: str, world: int, enabled: bool) -> bool:
    """SyncBatchNorm for multi-worker CUDA training: trainable BN on 2 images per GPU
    (from scratch, no frozen statistics) needs the statistics of the whole batch.
    torch's SyncBatchNorm refuses CPU tensors, so CPU (gloo) runs keep per-worker BN."""
    return enabled and device_type == "cuda" and world > 1


def process_group_backend(use_gpu: bool) -> str:
    """The torch.distributed backend string Ray Train starts the workers with.

    NCCL serves CUDA tensors only; the metric all-reduce, the metric broadcast and the
    prediction gather move CPU data, so GPU runs pair NCCL (for DDP's gradients) with gloo
    for every CPU collective. Object collectives then also use gloo: evaluation's gathered
    predictions never pass through GPU memory.
    """
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def plan_for(
    train: TrainConfig, device_type: str, world: int, bf16_supported: bool | None = None, fixed_size: bool = False
) -> DevicePlan:
    """`fixed_size`: every batch has the same shape (SSD's resize), so cuDNN's autotuner,
    which benchmarks each new input shape once, pays off; with varying sizes it would tune
    again for every batch."""
    dtype = autocast_dtype(train.amp, train.amp_dtype, device_type, bf16_supported)
    return DevicePlan(
        device_type=device_type,
        autocast_dtype=dtype,
        grad_scaler=needs_grad_scaler(dtype),
        channels_last=_enabled(train.channels_last, device_type),
        sync_batchnorm=use_sync_batchnorm(device_type, world, train.sync_bn),
        pin_memory=device_type == "cuda",
        cudnn_benchmark=device_type == "cuda" and fixed_size,
    )


# ---------------------------------------------------------------- applying the plan


def _backbone_input_channels_last(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    if torch.is_tensor(x) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def apply_channels_last(model: nn.Module) -> nn.Module:
    """channels_last weights, and the batched 4-D input of the backbone in the same format.

    torchvision detectors take a list of 3-D images and batch them inside the model
    (GeneralizedRCNNTransform), so the format goes on the model and on the batch it builds,
    never on the per-image tensors (channels_last needs rank 4).
    """
    model = model.to(memory_format=torch.channels_last)
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        backbone.register_forward_pre_hook(_backbone_input_channels_last)
    return model


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Trainable BatchNorm layers to SyncBatchNorm (same state-dict keys, so checkpoints load
    into a plain-BN model for evaluation and prediction). Frozen BN and GroupNorm are kept."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def make_grad_scaler(plan: DevicePlan) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(plan.device_type) if plan.grad_scaler else None


def optimizer_step(
    loss: torch.Tensor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
) -> None:
    """Backward and step, with loss scaling when there is a scaler (fp16) and gradient
    clipping on the unscaled gradients."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
