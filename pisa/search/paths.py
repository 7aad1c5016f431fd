"""Where a study keeps things and what it names them: its directory, its state file, its
trials' storage and marks, and the names of its runs' tags (from `pisa.tracking.tags`)."""

from __future__ import annotations

from ..core import storage
from ..tracking import tags
from ..trials import recovery
from .study import Study

STATE_FILE = "pisa_study.json"
TRIAL_TAG = tags.TRIAL
SEED_VALUES_TAG = tags.SEED_VALUES  # {seed: metric} of a multi-seed trial, at its best epoch


def study_dir(study: Study) -> str:
    """The study's directory: a local path or a URI (see `pisa.core.storage`)."""
    return storage.join(study.base_config.storage_path, study.name)


def state_path(study: Study) -> str:
    return storage.join(study_dir(study), STATE_FILE)


def trial_storage(study: Study) -> str:
    return storage.join(study_dir(study), "trials")


def done_mark(study: Study, trial_id: str) -> str:
    return storage.join(trial_storage(study), trial_id, recovery.DONE_MARK)
