"""`pisa compare`: train any set of configs on the same seeds and say how they differ.

Every config trains on every seed as one training grid (`pisa.comparisons.training_grid`): as
many side by side as the Ray cluster holds, each with its own resources. The final-epoch
metric per config is summarised over the seeds and each config is compared, seed by
seed, with its reference (by default the first config) in the table `pisa study validate`
prints (`pisa.comparisons.table`). One MLflow run holds the table, per-seed values, per-class
APs and a plot, with the trainings nested under it.

A compare is resumable: its state (`compare.json`) lies in its directory under the storage
path; running the same command again with the same `--name` continues the trainings that
had not finished and keeps the ones that had.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pydantic import BaseModel

from .. import tracking
from ..core import storage
from ..core.config import ExperimentConfig, load_config
from ..core.errors import ConfigError
from ..core.progress import say
from ..tracking import tags as tag
from ..tracking.tags import Kind, RunStatus
from ..training.cluster import check_training_fits, worker_resources
from ..training.driver import DriverSession
from ..trials.capacity import cluster_totals, resolve, trial_driver_resources
from .table import Validation, Variant, VariantResult, compare, log_validation
from .training_grid import INTERRUPTED, GridTraining, slug, train_grid

STATE_FILE = "compare.json"


@dataclass
class Entry:
    """One config of a compare: its label, its config (overrides applied) and the index of
    the entry it is compared with (its own index: a reference row)."""

    label: str
    config: ExperimentConfig
    reference: int = 0
    source: str = ""
    train_images: int | None = None  # per epoch, filled once the data is prepared


class CompareState(BaseModel):
    """What a compare needs to continue: written before its first training starts."""

    name: str
    tracking_uri: str
    experiment: str
    metric: str
    mode: str
    seeds: list[int]
    labels: list[str]
    references: list[int]
    configs: list[dict[str, Any]]
    run_id: str
    finished: bool = False


def load_entries(paths: list[str], overrides: list[str] | None = None) -> list[Entry]:
    """The configs of `pisa compare A.yaml B.yaml ...`, each compared with the first; a label
    per config from its file name (a repeated name gets its position)."""
    if len(paths) < 2:
        raise ConfigError("pisa compare: give at least two configs (the first is the reference)")
    stems = [Path(p).stem for p in paths]
    labels = [s if stems.count(s) == 1 else f"{s} ({i + 1})" for i, s in enumerate(stems)]
    return [Entry(label, load_config(p, overrides), 0, str(p)) for label, p in zip(labels, paths)]


def seed_list(seeds: int, first_seed: int = 0) -> list[int]:
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be at least 1 (2 or more for an interval)")
    return list(range(first_seed, first_seed + seeds))


def run_compare(
    entries: list[Entry],
    *,
    seeds: list[int],
    name: str | None = None,
    storage_path: str = "ray_results",
    metric: str = "bbox_mAP",
    mode: str = "max",
    address: str | None = None,
    verbose: bool = False,
    title: str | None = None,
) -> Validation:
    """Train every entry on every seed (seed by seed), or continue the compare `name` that a
    crash or Ctrl-C cut short; log and return the comparison. Checks everything it can
    (configs, an existing compare of that name, the cluster) before anything trains."""
    name = name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    root = storage.join(storage.normalize(storage_path), name)
    uri = entries[0].config.tracking.resolved_uri()
    experiment = entries[0].config.tracking.experiment
    configs = [_training_config(e.config, uri, experiment, storage.join(root, "runs")) for e in entries]
    state = _existing_state(root, name, configs, entries, seeds, metric)
    driver = DriverSession(uri, address=address, storage_path=root, source=f"compare {name}", verbose=verbose)
    sizes = _start_ray(configs, uri, driver)
    for entry, config, (_, images) in zip(entries, configs, sizes):
        entry.train_images = images
        check_training_fits(
            config.train,
            address,
            f"{entry.source or entry.label}: train",
            hint="on CPUs: --set train.use_gpu=false; fewer workers: --set train.workers=N",
        )
    # a compare killed before Tune saved its first state starts its trainings afresh
    resume = state is not None and storage.exists(storage.join(root, "trainings", "tuner.pkl"))
    if state is None:
        state = _start(name, uri, experiment, (metric, mode), seeds, entries, configs, root, title)
    else:
        tracking.tracker(uri).update_status(state.run_id, RunStatus.RUNNING)
        say(f"continuing compare {name} (MLflow run {state.run_id}): finished trainings stay")
    results = [VariantResult(Variant(e.label, {"config": e.source}, reference=e.reference)) for e in entries]
    jobs = [(seed, i) for seed in seeds for i in range(len(entries))]  # seed-major: cut short, pairs stay whole
    trainings = [_training(configs[i], entries[i], seed, name, sizes[i][0]) for seed, i in jobs]
    parallel = _trainings_at_once(configs, len(jobs))
    say(f"{len(jobs)} trainings ({len(entries)} configs x {len(seeds)} seeds), {parallel} at a time")
    try:
        outcomes = train_grid(
            trainings,
            uri=uri,
            parent_run_id=state.run_id,
            storage_path=root,
            name="trainings",
            in_trial=True,
            resources={},
            concurrent=parallel,
            max_failures=2,
            score=(metric, mode),
            num_classes=sizes[0][0],
            resume=resume,
        )
    except KeyboardInterrupt:
        outcomes = None
    if outcomes is None or any(out.error == INTERRUPTED for out in outcomes):
        _interrupted(state, name, driver)
    for (seed, i), out in zip(jobs, outcomes):
        results[i].add(seed, out, metric)
    compare(results, mode)
    result = Validation(title or name, metric, mode, seeds, results, state.run_id, uri, kind="compare")
    log_validation(result)
    tracking.tracker(uri).end_run(state.run_id, RunStatus.FINISHED if result.ok else RunStatus.FAILED)
    storage.write_text(storage.join(root, STATE_FILE), state.model_copy(update={"finished": True}).model_dump_json())
    return result


def _interrupted(state: CompareState, name: str, driver: DriverSession) -> NoReturn:
    """Ctrl-C or SIGTERM: the compare's run KILLED, its state left unfinished, and how to go on."""
    driver.interrupted(state.run_id)
    say(f"compare {name} interrupted: continue it with the same command (finished trainings stay)")
    raise KeyboardInterrupt


def _training_config(cfg: ExperimentConfig, uri: str, experiment: str, runs: str) -> ExperimentConfig:
    """A config as the compare trains it: its paths absolute, logged to the compare's store."""
    cfg = cfg.resolve_paths()
    return cfg.model_copy(
        update={
            "tracking": cfg.tracking.model_copy(update={"uri": uri, "experiment": experiment}),
            "storage_path": runs,
        }
    )


def _existing_state(
    root: str, name: str, configs: list[ExperimentConfig], entries: list[Entry], seeds: list[int], metric: str
) -> CompareState | None:
    """The state of an unfinished compare named `name` with these configs and seeds, or None
    if there is none; a finished one, or one of other configs, is an error (nothing started)."""
    path = storage.join(root, STATE_FILE)
    if not storage.exists(path):
        return None
    state = CompareState.model_validate_json(storage.read_text(path))
    if state.finished:
        raise ConfigError(
            f"--name {name}: that compare finished already (MLflow run {state.run_id}); choose another name"
        )
    same = (
        state.configs == [c.model_dump(mode="json") for c in configs]
        and state.seeds == seeds
        and state.labels == [e.label for e in entries]
        and state.metric == metric
    )
    if not same:
        raise ConfigError(
            f"--name {name}: an unfinished compare of other configs, seeds or metric is at "
            f"{storage.display(root)}; run it with its own command to continue it, or choose another name"
        )
    return state


def _start_ray(configs: list[ExperimentConfig], uri: str, driver: DriverSession) -> list[tuple[int, int]]:
    """Ray started (or joined) while every config's data is checked and prepared; per config
    its (classes, training images)."""
    from ..data import check_data_files  # torchvision, pycocotools: where the data is prepared
    from ..training.driver import prepare_data_sizes

    for cfg in configs:
        check_data_files(cfg.data)

    def prepare() -> list[tuple[int, int]]:
        sizes: dict[str, tuple[int, int]] = {}
        for cfg in configs:
            key = cfg.data.model_dump_json()
            if key not in sizes:
                sizes[key] = prepare_data_sizes(cfg)
        tracking.tracker(uri)  # a new SQLite store creates its tables here
        return [sizes[cfg.data.model_dump_json()] for cfg in configs]

    return driver.start_with(prepare, dashboard=False)


def _start(
    name: str,
    uri: str,
    experiment: str,
    score: tuple[str, str],
    seeds: list[int],
    entries: list[Entry],
    configs: list[ExperimentConfig],
    root: str,
    title: str | None,
) -> CompareState:
    """The compare's MLflow run and its state file, before the first training starts."""
    metric, mode = score
    run_id = tracking.tracker(uri).start_run(
        experiment,
        title or f"compare {name}",
        params={
            "configs": json.dumps([e.source or e.label for e in entries]),
            "seeds": json.dumps(seeds),
            "metric": metric,
            "references": json.dumps([entries[e.reference].label for e in entries]),
        },
        tags={tag.KIND: Kind.COMPARE, tag.COMPARE: name},
    )
    state = CompareState(
        name=name,
        tracking_uri=uri,
        experiment=experiment,
        metric=metric,
        mode=mode,
        seeds=seeds,
        labels=[e.label for e in entries],
        references=[e.reference for e in entries],
        configs=[c.model_dump(mode="json") for c in configs],
        run_id=run_id,
    )
    storage.write_text(storage.join(root, STATE_FILE), state.model_dump_json(indent=2))
    say(
        f"compare {name}: {len(entries)} configs x seeds {seeds}, final-epoch {metric}; MLflow run {run_id}; "
        f"continue it after a crash with the same command"
    )
    return state


def _training(cfg: ExperimentConfig, entry: Entry, seed: int, name: str, num_classes: int) -> GridTraining:
    """One config on one seed, in its own process if it has one worker (else a TorchTrainer)."""
    exp = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
    in_trial = exp.train.workers == 1
    return GridTraining(
        exp,
        f"{slug(entry.label)} seed {seed}",
        {tag.KIND: Kind.COMPARE_TRAINING, tag.COMPARE: name, tag.VARIANT: entry.label, tag.SEED: str(seed)},
        in_trial=in_trial,
        resources=worker_resources(exp) if in_trial else trial_driver_resources(),
        num_classes=num_classes,
    )


def _trainings_at_once(configs: list[ExperimentConfig], jobs: int) -> int:
    """As many trainings side by side as the cluster holds of the largest config."""
    totals = cluster_totals()
    return min(resolve(cfg.train, totals, limit=jobs).at_once for cfg in configs)
