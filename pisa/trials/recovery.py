"""A resumed study trusts what is on storage, not Tune's last experiment snapshot.

Tune saves its experiment state every few seconds; a driver killed between two saves
leaves a snapshot that can name a trial checkpoint that checkpoint retention has since
deleted (Tune then fails the trial `max_failures` times: "does not exist on storage
anymore"), and that can call a trial running when it had already finished.

Two records survive any driver crash and win over the snapshot:
- the checkpoints actually on storage: a restored trial whose recorded checkpoint is
  gone continues from the newest intact one in its directory, else from scratch;
- a trial's *done mark* (`pisa_done.json` in its storage directory), written by the
  driver when the trial ends and before its MLflow run is closed: a trial that has one
  is not trained again; it reports its final result once so that Tune, the scheduler
  and the searcher see it end as before.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..core import storage
from ..core.checkpoint import unreadable_reason
from ..training import ray_private

DONE_MARK = "pisa_done.json"
FAILED_MARK = "pisa_failed.txt"  # a trial that failed for a reason a restart can't fix
CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")


def write_done_mark(location: str, result: dict[str, Any]) -> None:
    """Record that a trial ended, with the result it ended on (JSON numbers and strings)."""
    storage.write_text(location, json.dumps(result, default=str))


def read_done_mark(location: str) -> dict[str, Any] | None:
    """The final result of a trial that ended before, None if it has not."""
    if not storage.exists(location):
        return None
    try:
        return dict(json.loads(storage.read_text(location)))
    except ValueError:  # cut short by a crash while it was written: the trial did not end
        return None


@dataclass
class Repair:
    trial_id: str
    gone: str
    continue_from: str | None  # the checkpoint directory's name, None: from scratch
    damage: str | None = None  # why the recorded checkpoint is unusable, None: it is gone

    def line(self) -> str:
        start = f"from {self.continue_from}" if self.continue_from else "from scratch (no usable checkpoint left)"
        what = f"is unreadable ({self.damage})" if self.damage else "is gone"
        return f"warning: trial {self.trial_id}: its last recorded checkpoint {self.gone} {what}; continuing {start}"


def _damage(fs, path: str, checkpoint_file: str) -> str | None:
    """Why a checkpoint directory cannot be continued from, None if it can: its weights file
    missing or empty (cut short while written: it is written whole, then renamed), or present
    but unreadable (a full disk, a copy interrupted: `unreadable_reason`)."""
    import pyarrow.fs as pafs

    file = f"{path.rstrip('/')}/{checkpoint_file}"
    info = fs.get_file_info(file)
    if info.type != pafs.FileType.File:
        return "missing"
    if not info.size:
        return "empty"
    try:
        with fs.open_input_file(file) as f:
            return unreadable_reason(f)
    except OSError as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _intact(fs, path: str, checkpoint_file: str) -> bool:
    return _damage(fs, path, checkpoint_file) is None


def newest_intact_checkpoint(fs, trial_dir: str, checkpoint_file: str, max_index: int | None = None) -> str | None:
    """The path of the newest intact `checkpoint_NNNNNN` directory of a trial, if any, among
    those numbered up to `max_index`."""
    import pyarrow.fs as pafs

    try:
        entries = fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
    except OSError:
        return None
    found = []
    for info in entries:
        match = CHECKPOINT_DIR.match(info.base_name)
        if info.type == pafs.FileType.Directory and match and (max_index is None or int(match.group(1)) <= max_index):
            found.append((int(match.group(1)), info.path))
    for _, path in sorted(found, reverse=True):
        if _intact(fs, path, checkpoint_file):
            return path
    return None


def repair_restored_trial(trial, checkpoint_file: str, logged_epochs: int | None = None) -> Repair | None:
    """Point a restored Tune trial at a checkpoint that exists; the repair made, if any.

    With `logged_epochs` (the epochs MLflow has for the trial), only checkpoints of those
    epochs qualify (Tune numbers a trial's checkpoints 0, 1, ... one per reported epoch): a
    newer one was written by a driver that died before logging its epoch, and continuing
    after it would leave that epoch out of MLflow.

    Works on Tune's trial object before the trial starts (Tune's own restore would try the
    recorded path and fail). Reaches into Tune's checkpoint bookkeeping, which has no
    public setter: a Tune without it leaves the trial as it is."""
    latest = ray_private.latest_checkpoint_result(trial)
    if latest is None or latest.checkpoint is None:
        return None
    checkpoint = latest.checkpoint
    fs = checkpoint.filesystem
    damage = _damage(fs, checkpoint.path, checkpoint_file)
    if damage is None:
        return None
    max_index = None if logged_epochs is None else logged_epochs - 1
    newest = newest_intact_checkpoint(fs, trial.storage.trial_fs_path, checkpoint_file, max_index)
    kept = [r for r in ray_private.checkpoint_results(trial) if _intact(fs, r.checkpoint.path, checkpoint_file)]
    replacement = None
    if newest is not None:
        replacement = next((r for r in kept if r.checkpoint.path == newest), None)
        if replacement is None:
            replacement = ray_private.checkpoint_result(type(checkpoint)(newest, filesystem=fs))
            kept.append(replacement)
    ray_private.replace_checkpoint_results(trial, kept, replacement)
    return Repair(
        trial.trial_id,
        checkpoint.path.rstrip("/").rsplit("/", 1)[-1],
        newest.rstrip("/").rsplit("/", 1)[-1] if newest else None,
        None if damage == "missing" else damage,
    )
