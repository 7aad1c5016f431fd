"""The names pisa gives its MLflow runs' tags, and their values: what kind of run it is
(`Kind`), where it stands (`Status`), how it ended in MLflow's own terms (`RunStatus`).

Every writer and reader of a run's tags uses these; the runs of earlier versions carry
the same names and values.
"""

from __future__ import annotations

from enum import StrEnum

# what a run is and where it stands
KIND = "pisa.kind"  # a `Kind`
STATUS = "pisa.status"  # a `Status`
ERROR = "pisa.error"  # the one line a failed run ended on

# a study's runs
STUDY = "pisa.study"  # the study's name (on its own run, its trials', its validation's)
TRIAL = "pisa.trial_id"  # a trial's Tune id
SEARCHED = "pisa.searched"  # the searched config keys, comma separated
EPOCHS = "pisa.epochs"  # the epochs a trial trained
STOPPED_BY = "pisa.stopped_by"  # what stopped a trial early
SEED_VALUES = "pisa.seed_values"  # {seed: metric} of a multi-seed trial, at its best epoch
BEST_RUN_ID = "pisa.best_run_id"  # on the study's run: its best trial's run
BEST_TRIAL = "pisa.best_trial"  # on the study's run: its best trial's id
BEST_PREFIX = "pisa.best_"  # `pisa.best_<metric>`: see `best`

# a validation's runs
STUDY_RUN_ID = "pisa.study_run_id"  # on a validation's run: the study's run
VALIDATION_RUN_ID = "pisa.validation_run_id"  # on the study's run: its latest validation's run
VARIANT = "pisa.variant"
SEED = "pisa.seed"
GRID_JOB = "pisa.grid_job"  # a training's index in its grid
COMPARE = "pisa.compare"  # a compare's name (on its own run and its trainings')

# reproductions, registered models, lineage
REPRODUCES = "pisa.reproduces"  # the run a reproduction reruns
SOURCE_RUN_ID = "pisa.source_run_id"  # on a registered model version: the run it came from
VERSION_PREFIX = "pisa.version."  # `pisa.version.<library>`: the versions a run ran with

# MLflow's own
PARENT_RUN_ID = "mlflow.parentRunId"  # a nested run's parent
NOTE = "mlflow.note.content"  # the run's description, markdown


def best(metric: str) -> str:
    """The tag of a run's best value of `metric` (`pisa.best_bbox_mAP`)."""
    return f"{BEST_PREFIX}{metric}"


def number(value: float) -> str:
    """A value as a tag, every digit kept (the shortest text that reads back as the same
    float): the study ranks its trials by these tags, and 6 significant digits tie trials
    that differ further down (two APs of 0.0014346 apart by 4e-9)."""
    return repr(float(value))


class Kind(StrEnum):
    """`pisa.kind`: what made a run."""

    STUDY = "study"  # a study's own run
    TRIAL = "trial"  # one trial of a study, nested under it
    TRAIN = "train"  # `pisa train`
    REPRODUCE = "reproduce"  # `pisa reproduce`
    VALIDATION = "validation"  # `pisa study validate`'s own run
    VALIDATION_TRAINING = "validation_training"  # one training of a validation, nested under it
    COMPARE = "compare"  # `pisa compare`'s (and `pisa paper`'s) own run
    COMPARE_TRAINING = "compare_training"  # one training of a compare, nested under it


class Status(StrEnum):
    """`pisa.status`: where a study or trial stands (MLflow's own status can't say stopped early)."""

    RUNNING = "running"
    FINISHED = "finished"
    STOPPED_EARLY = "stopped_early"  # by the study's scheduler (ASHA)
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM


class RunStatus(StrEnum):
    """MLflow's run states that pisa sets."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"


DONE = (Status.FINISHED, Status.STOPPED_EARLY, Status.FAILED)  # a trial that will not train again
