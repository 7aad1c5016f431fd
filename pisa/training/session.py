"""Where the per-worker training loop runs: a Ray Train worker or a Tune trial itself.

`pisa.training.engine.run_worker` speaks only to a `TrainSession`: its rank and world size, the
device, how to place the model, how to report an epoch (metrics and
a checkpoint directory) and where to resume from. Two implementations:

- `RayTrainSession`: one worker of a Ray Train `TorchTrainer` (any number of workers,
  DDP over gloo or NCCL). `pisa train` and multi-worker study trials use it.
- `TuneTrialSession`: the Tune trial's own process trains alone (world size 1). A
  1-worker study trial uses it, so it pays for no Ray Train controller, worker group,
  process group or second process start; with Tune's actor reuse the next trial on the
  same actor does not even import torch again.

For one worker both run the same code on the same data in the same order, so the same
seed gives the same metrics on either path (tests/test_study.py checks it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..core.epoch_report import EpochReport
from ..core.errors import NonFiniteLossError


class TrainSession(Protocol):
    """What the training loop needs from the process that runs it."""

    rank: int
    world_size: int

    def device(self) -> torch.device: ...

    def prepare_model(
        self, model: nn.Module, find_unused_parameters: bool, broadcast_buffers: bool = True
    ) -> nn.Module: ...

    def report(self, metrics: EpochReport, checkpoint_dir: Path | None) -> None: ...

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The directory of the checkpoint to continue from after a restart, if any."""
        ...

    def stop_on(self, error: NonFiniteLossError) -> None:
        """End the training on a deterministic error, without a restart."""
        ...


@contextlib.contextmanager
def _checkpoint_dir(checkpoint) -> Iterator[Path | None]:
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as d:
        yield Path(d)


class RayTrainSession:
    """One worker of a Ray Train run (`ray.train.get_context()` and friends)."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(
        self, model: nn.Module, find_unused_parameters: bool, broadcast_buffers: bool = True
    ) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(
            model,
            parallel_strategy_kwargs={
                "find_unused_parameters": find_unused_parameters,
                "broadcast_buffers": broadcast_buffers,
            },
        )

    def report(self, metrics: EpochReport, checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        import ray.train

        return _checkpoint_dir(ray.train.get_checkpoint())

    def stop_on(self, error: NonFiniteLossError) -> None:
        """Ray Train restarts a worker group whose worker raised, up to `max_failures` times,
        whatever the error: every worker returns instead, and the driver reads the error from
        the run's return value (`pisa.training.engine.stopped_on`)."""


class TuneTrialSession:
    """A 1-worker training inside a Tune function trainable: reports go straight to Tune."""

    rank = 0
    world_size = 1

    def __init__(self, use_gpu: bool) -> None:
        self.use_gpu = use_gpu

    def device(self) -> torch.device:
        if self.use_gpu and torch.cuda.is_available():
            # Tune sets CUDA_VISIBLE_DEVICES to the trial's one GPU
            torch.cuda.set_device(0)
            return torch.device("cuda", 0)
        return torch.device("cpu")

    def prepare_model(
        self, model: nn.Module, find_unused_parameters: bool, broadcast_buffers: bool = True
    ) -> nn.Module:
        return model.to(self.device())

    def report(self, metrics: EpochReport, checkpoint_dir: Path | None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        from ray import tune

        return _checkpoint_dir(tune.get_checkpoint())

    def stop_on(self, error: NonFiniteLossError) -> None:
        """The trial fails with the error; the study marks it so a retry fails at once."""
        raise error
