"""A training checkpoint's format: one directory, written by the train loop and read by
resume, `pisa predict`, the model registry and the MLflow upload.

The directory holds `checkpoint.pt` (tensors and plain values only, so it loads with
`torch.load(weights_only=True)`: a checkpoint may come from a shared store and must not run
code) and `config.json`, the training config of the weights. Since the checkpoints carry
their classes (`class_names` and `category_ids`, in the model's label order 1..C), a
checkpoint names its detections without the training annotations; those of earlier versions
have none (`Checkpoint.class_names is None`) and their readers fall back to the annotations.

torch is imported where a checkpoint is read or written, not with this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .errors import CheckpointError

if TYPE_CHECKING:
    from .config import ExperimentConfig

CHECKPOINT_FILE = "checkpoint.pt"  # the state: weights, optimizer, scheduler, scaler, counters, classes
CONFIG_FILE = "config.json"  # beside it: the training config of the weights


@dataclass
class Checkpoint:
    """What a training checkpoint holds. `epoch` is the 0-based index of the epoch it ends
    (a resume starts at `epoch + 1`); `iteration` the global step count after it."""

    model: dict[str, Any]  # the model's state dict
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]  # empty without a GradScaler
    epoch: int
    iteration: int
    config: ExperimentConfig | None = None  # config.json; None when not read (or not there)
    class_names: list[str] | None = None  # label i+1's category name; None: an earlier version's
    category_ids: list[int] | None = None  # label i+1's COCO category id; None: an earlier version's
    metrics: dict[str, float] = field(default_factory=dict)  # the epoch's numeric metrics

    def state(self) -> dict[str, Any]:
        """What `checkpoint.pt` holds (everything but the config)."""
        state: dict[str, Any] = {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "epoch": int(self.epoch),
            "iteration": int(self.iteration),
            "metrics": {k: float(v) for k, v in self.metrics.items()},
        }
        if self.class_names is not None:
            state["class_names"] = [str(n) for n in self.class_names]
        if self.category_ids is not None:
            state["category_ids"] = [int(i) for i in self.category_ids]
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Checkpoint:
        """The checkpoint of what `checkpoint.pt` held (see `is_checkpoint_state`); no config."""
        names, ids = state.get("class_names"), state.get("category_ids")
        return cls(
            model=state["model"],
            optimizer=state.get("optimizer") or {},
            scheduler=state.get("scheduler") or {},
            scaler=state.get("scaler") or {},
            epoch=int(state.get("epoch", -1)),
            iteration=int(state.get("iteration", 0)),
            class_names=[str(n) for n in names] if isinstance(names, list) else None,
            category_ids=[int(i) for i in ids] if isinstance(ids, list) else None,
            metrics=dict(state.get("metrics") or {}),
        )


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint directory's `checkpoint.pt`; a file path as given."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The files of a checkpoint directory that go with it to MLflow (its `checkpoint/`
    artifact): the state and the config, those that exist. Not the PISA diagnostics."""
    directory = Path(directory)
    return [p for p in (directory / CHECKPOINT_FILE, directory / CONFIG_FILE) if p.exists()]


def write_checkpoint(directory: str | Path, payload: Checkpoint) -> Path:
    """Write `payload` into `directory` (`checkpoint.pt`, and `config.json` if it has a
    config); the path of `checkpoint.pt`."""
    import torch

    from .storage import atomic_path

    directory = Path(directory)
    path = directory / CHECKPOINT_FILE
    with atomic_path(path) as tmp:  # whole or not at all: a crash never leaves half a checkpoint
        torch.save(payload.state(), tmp)
    if payload.config is not None:
        with atomic_path(directory / CONFIG_FILE) as tmp:
            tmp.write_text(payload.config.model_dump_json(indent=2))
    return path


def unreadable_reason(f: BinaryIO) -> str | None:
    """Why an open `checkpoint.pt` (a seekable binary file: local or a pyarrow input file) cannot
    be read, None if it looks whole. Reads its zip directory and checks its pickle's CRC, not
    the tensors: a file cut short (a full disk, a copy interrupted) or overwritten fails, at the
    cost of a few reads at its end."""
    import zipfile

    try:
        with zipfile.ZipFile(f) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pickles:
                return "not a torch checkpoint (no data.pkl)"
            archive.read(pickles[0])  # checks the entry's CRC
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def read_state(path: str | Path) -> Any:
    """What a `.pt` file holds, tensors and plain values only (`weights_only=True`), on the CPU."""
    import torch

    return torch.load(checkpoint_file(path), map_location="cpu", weights_only=True)


def read_checkpoint(path: str | Path, *, with_config: bool = False) -> Checkpoint:
    """The checkpoint in a directory (or its `checkpoint.pt`). `with_config` also reads the
    `config.json` beside it (parsed with today's schema: a resume, whose config comes from
    elsewhere, does not need it). Raises what reading raises (OSError, pickle and torch
    errors, `ValueError` for a file that is no training checkpoint, `ConfigError`)."""
    state = read_state(path)
    if not is_checkpoint_state(state):
        raise ValueError(f"{checkpoint_file(path)}: not a training checkpoint (no model state)")
    checkpoint = Checkpoint.from_state(state)
    if with_config:
        checkpoint.config = read_config(checkpoint_file(path).parent / CONFIG_FILE)
    return checkpoint


def check_checkpoint(path: str | Path) -> Path:
    """A checkpoint the user named (`pisa train --resume PATH`), checked where they named it,
    before anything starts: its absolute path (a relative one is from the user's working
    directory, which a Ray worker does not share) once its `checkpoint.pt` reads as a training
    checkpoint. Raises `CheckpointError`, one line naming the file, for a missing, empty,
    cut or otherwise unreadable one."""
    given = Path(path).expanduser().absolute()
    file = checkpoint_file(given)
    if not file.is_file():
        raise CheckpointError(f"--resume {file}: {'not a file' if file.exists() else 'no such file'}")
    if file.stat().st_size == 0:
        raise CheckpointError(f"--resume {file}: an empty file, not a training checkpoint")
    try:
        read_checkpoint(file)
    except Exception as exc:  # whatever reading raises (OSError, EOFError, pickle, torch), it is unusable
        lines = str(exc).strip().splitlines()
        first = lines[0] if lines else ""
        if first.startswith(f"{file}: "):  # read_checkpoint's own verdict: a file that is no checkpoint
            raise CheckpointError(f"--resume {first}") from None
        reason = first or type(exc).__name__
        raise CheckpointError(f"--resume {file}: not a readable training checkpoint ({reason})") from None
    return given


def is_checkpoint_state(state: Any) -> bool:
    """Whether what a `.pt` file held is a training checkpoint's state (not bare weights)."""
    return isinstance(state, dict) and isinstance(state.get("model"), dict)


def read_config(path: str | Path) -> ExperimentConfig:
    """A checkpoint's `config.json` as today's `ExperimentConfig`. Raises OSError or
    ValueError for a file that can't be read, `ConfigError` for one that isn't valid."""
    from .config import parse_config

    data = json.loads(Path(path).read_text())
    return parse_config(data, source=str(path))
