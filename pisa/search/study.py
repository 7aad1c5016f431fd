"""Loading and checking a study file before anything starts.

Every value the search can produce is checked against the training config's own
schema (bounds of k, b, lr, the sampler names...), so a bad range fails here, with the
study file and the field named, not in trial 7 an hour later.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..core.config import (
    ExperimentConfig,
    apply_overrides,
    format_validation_error,
    load_yaml,
    parse_config,
    set_dotted,
)
from ..core.errors import ConfigError, one_line
from ..core.objective import Objective
from ..core.progress import say
from ..planning.packing import (
    WORKER_OVERHEAD_GIB,
    GpuMemory,
    Layout,
    Packing,
    keep,
    layout_free_norm,
    pack,
    per_worker_losses,
)
from ..planning.workload import Workload
from ..trials.capacity import Capacity, resolve
from .schema import BASELINE, PAPER_DEFAULTS, StudyConfig, TrialResources


def get_dotted(data: dict[str, Any], key: str, default: Any = None) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class Study:
    """A validated study: its config, the resolved base experiment dict, its source file.

    With `pack: auto`, `cfg.resources_per_trial`, `cfg.max_concurrent_trials` and the base
    config's `train.*` are the packed ones (what the trials train with); `packing` says what
    was given and why it changed, or why not."""

    def __init__(
        self,
        cfg: StudyConfig,
        base: dict[str, Any],
        source: Path,
        overrides: list[str] | None = None,
        packing: Packing | None = None,
    ):
        self.cfg = cfg
        self.base = base  # an ExperimentConfig dump, paths absolute: trials set dotted keys in copies of it
        self.base_config = ExperimentConfig.model_validate(base)  # the same, typed, for everything that reads it
        self.source = source
        self.overrides = list(overrides or [])  # `--set` items, kept with the study's state
        self.packing = packing

    def with_tracking_uri(self, uri: str) -> Study:
        """This study logging to `uri` (a resumed study keeps the store it started with)."""
        base = copy.deepcopy(self.base)
        base["tracking"]["uri"] = uri
        return Study(self.cfg, base, self.source, self.overrides, self.packing)

    def resolved(self) -> dict[str, Any]:
        """Everything needed to rebuild this study without its file (saved with its state)."""
        return {
            "study": self.cfg.model_dump(mode="json"),
            "base": self.base,
            "source": str(self.source),
            "overrides": self.overrides,
        }

    @classmethod
    def from_resolved(cls, data: dict[str, Any]) -> Study:
        return cls(StudyConfig.model_validate(data["study"]), data["base"], Path(data["source"]), data.get("overrides"))

    @property
    def name(self) -> str:
        return self.cfg.name

    def seeds(self) -> list[int]:
        """The seeds every point trains with (racing: may train), in order: the base config's
        `train.seed` and the next ones."""
        first = self.base_config.train.seed
        return list(range(first, first + self.max_seeds()))

    def max_seeds(self) -> int:
        """Trainings of a point at most: `seeds`, or racing's `max_seeds`."""
        return self.cfg.racing.max_seeds if self.cfg.racing is not None else self.cfg.seeds

    def seeds_at_once(self) -> int:
        """Trainings of a point side by side: `seeds`, or racing's first batch."""
        return self.cfg.racing.min_seeds if self.cfg.racing is not None else self.cfg.seeds

    @property
    def objective(self) -> Objective:
        return Objective(self.cfg.metric, self.cfg.mode)

    def trains_in_trial(self, seeds: int | None = None) -> bool:
        """Whether a trial of `seeds` seeds (default: the study's) trains in the Tune trial's own
        process: 1 worker and 1 seed; a point with several seeds drives one Ray Train run per seed."""
        seeds = self.max_seeds() if seeds is None else seeds
        return self.cfg.trial_process == "auto" and self.cfg.resources_per_trial.workers == 1 and seeds == 1

    def workload(self) -> Workload:
        """What the cost plan prices: this study's trials, without the search."""
        cfg = self.cfg
        return Workload(
            name=self.name,
            source=self.source,
            experiment=self.base_config,
            num_samples=cfg.num_samples,
            search_keys=tuple(cfg.search_space),
            seeds=self.seeds_at_once(),
            race_seeds=self.cfg.racing.max_seeds if self.cfg.racing is not None else 0,
            max_concurrent_trials=cfg.max_concurrent_trials,
            scheduler=cfg.scheduler.type,
            grace_period=cfg.scheduler.grace_period,
            reduction_factor=cfg.scheduler.reduction_factor,
            packing=self.packing,
            validation_points=cfg.validation.top + 1 if cfg.validation is not None else 0,
            validation_seeds=cfg.validation.seeds if cfg.validation is not None else 0,
        )

    def capacity(self, totals: Mapping[str, float]) -> Capacity:
        """How many of this study's points train at once on a cluster of `totals`: its limit,
        and no more points of `seeds` trainings than the cluster holds (`trials.capacity`)."""
        return resolve(
            self.base_config.train,
            totals,
            limit=self.cfg.max_concurrent_trials,
            group=self.seeds_at_once(),
            source=f"{self.source}: {'racing.min_seeds' if self.cfg.racing is not None else 'seeds'}",
            queue=True,
        )

    def experiment(self, params: dict[str, Any]) -> ExperimentConfig:
        """The training config of one trial: the base with the sampled values set."""
        data = copy.deepcopy(self.base)
        for key, value in params.items():
            set_dotted(data, key, value)
        return parse_config(data, source=f"{self.source} (trial params {params})")

    def initial_points(self) -> list[dict[str, Any]]:
        """Points evaluated before Optuna proposes: the paper's defaults (and the baseline)."""
        spec = self.cfg.points_to_evaluate
        if isinstance(spec, list):
            raw = spec
        elif spec == "none":
            raw = []
        else:
            raw = [PAPER_DEFAULTS] + ([BASELINE] if spec == "paper+baseline" else [])
        points = []
        for point in raw:
            full = {}
            for key, dist in self.cfg.search_space.items():
                value = point.get(key, get_dotted(self.base, key))
                full[key] = dist.closest(value)
            if full not in points:
                points.append(full)
        return points[: self.cfg.num_samples]


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read, validate and check a study file; errors name the file and the field."""
    path = Path(path).resolve()
    data = load_yaml(path)
    # `--set` keys that are study fields go to the study, the rest to its training config
    study_fields = set(StudyConfig.model_fields) - {"experiment"}
    study_over = [o for o in overrides or [] if o.split("=", 1)[0].split(".")[0].strip() in study_fields]
    exp_over = [o for o in overrides or [] if o not in study_over]
    data = apply_overrides(data, study_over)
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, path)) from None

    base: dict[str, Any] = {}
    if cfg.base is not None:
        base_path = cfg.base if cfg.base.is_absolute() else (path.parent / cfg.base)
        try:
            base = load_yaml(base_path)
        except ConfigError as exc:
            raise ConfigError(f"{path}: base: {exc}") from None
    base = merge(base, cfg.experiment)
    base = apply_overrides(base, exp_over)
    base.setdefault("name", cfg.name)
    _set_resources(base, cfg.resources_per_trial)
    resolved = parse_config(base, source=f"{path} (experiment)")
    study = Study(cfg, resolved.model_dump(mode="json"), path, overrides)
    _check_search_space(study)
    _check_stages(study)
    if cfg.resources_per_trial.pack == "auto":  # after the checks: it may probe the GPU
        packing = choose_packing(cfg.resources_per_trial, study.base_config, set(cfg.search_space))
        cfg = _packed_study(cfg, packing)
        _set_resources(base, cfg.resources_per_trial)
        resolved = parse_config(base, source=f"{path} (experiment)")
        study = Study(cfg, resolved.model_dump(mode="json"), path, overrides, packing)
    return study


def _check_stages(study: Study) -> None:
    """The scheduler's rungs and the validation stage must fit the study's schedule and budget."""
    cfg, path = study.cfg, study.source
    epochs = study.base_config.train.resolved().epochs
    if cfg.scheduler.type == "asha" and cfg.scheduler.grace_period > epochs:
        raise ConfigError(
            f"{path}: scheduler.grace_period: {cfg.scheduler.grace_period} is past the last epoch ({epochs}): "
            "no rung fits the schedule (fifo runs every trial to the end)"
        )
    if cfg.validation is not None and cfg.validation.top > cfg.num_samples:
        raise ConfigError(f"{path}: validation.top: {cfg.validation.top} is more than num_samples ({cfg.num_samples})")
    if cfg.racing is not None and cfg.scheduler.type != "fifo":
        raise ConfigError(
            f"{path}: scheduler.type: racing stops points by their seeds, at the schedule's end; "
            f"{cfg.scheduler.type} stops them by epoch before it: use fifo with racing"
        )
    if cfg.racing is not None and cfg.seeds != 1:
        raise ConfigError(
            f"{path}: seeds: {cfg.seeds} with racing, which decides each point's seeds "
            f"(racing.min_seeds to racing.max_seeds): leave seeds at 1"
        )
    if cfg.racing is not None and cfg.budget is not None:
        raise ConfigError(
            f"{path}: budget: a budget counts the epochs MLflow records, and racing trains its later "
            "seeds without epoch reports: give one of budget and racing"
        )
    startup = cfg.searcher.startup_trials
    if startup is not None and startup > cfg.num_samples:
        raise ConfigError(
            f"{path}: searcher.startup_trials: {startup} is more than num_samples ({cfg.num_samples}): "
            "the sampler would never propose a point"
        )


def _check_search_space(study: Study) -> None:
    """Every admissible extreme of the space, every initial point and every given point must
    give a valid training config."""
    cfg, base, path = study.cfg, study.base, study.source
    for key, dist in cfg.search_space.items():
        if get_dotted(base, key, default=KeyError) is KeyError:
            raise ConfigError(f"{path}: search_space.{key}: no such config field")
        for value in dist.extremes():
            data = copy.deepcopy(base)
            set_dotted(data, key, value)
            try:
                ExperimentConfig.model_validate(data)
            except ValidationError as exc:
                errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise ConfigError(f"{path}: search_space.{key}: value {value!r} is invalid ({errs})") from None
    for point in study.initial_points():
        study.experiment(point)
    if isinstance(cfg.points_to_evaluate, list):
        for i, point in enumerate(cfg.points_to_evaluate):
            unknown = sorted(set(point) - set(cfg.search_space))
            if unknown:
                raise ConfigError(f"{path}: points_to_evaluate[{i}]: {unknown} not in search_space")
            for key, value in point.items():
                problem = cfg.search_space[key].why_not(value)
                if problem:
                    raise ConfigError(f"{path}: points_to_evaluate[{i}].{key}: {value!r} {problem}")


def _validation_message(exc: ValidationError, path: Path) -> str:
    """One error in one line (`study.yaml: resources_per_trial.pack: Input should be 'auto'`),
    several as a list under the file's name."""
    if exc.error_count() > 1:
        return format_validation_error(exc, str(path))
    err = exc.errors()[0]
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    return f"{path}: {'.'.join(map(str, err['loc'])) or '<root>'}: {msg}"


def _set_resources(base: dict[str, Any], res: TrialResources) -> None:
    """Trial resources come from the study, not the base config."""
    set_dotted(base, "train.workers", res.workers)
    if res.images_per_worker is not None:  # an explicit layout is taken as given: the LR scales with its batch
        set_dotted(base, "train.images_per_worker", res.images_per_worker)
    set_dotted(base, "train.use_gpu", res.gpus_per_worker > 0)
    set_dotted(base, "train.cpus_per_worker", res.cpus_per_worker)
    if res.resources_per_worker:
        set_dotted(base, "train.resources_per_worker", res.resources_per_worker)
    if res.gpus_per_worker > 0:
        set_dotted(base, "train.gpus_per_worker", res.gpus_per_worker)


# ---------------------------------------------------------------- packing trials onto GPUs


# config keys the layout is decided on (the split, the normalisation, the memory per image): a
# study that searches one has trials the chosen layout may not suit
LAYOUT_KEYS = (
    "train.workers",
    "train.images_per_worker",
    "train.use_gpu",
    "train.gpus_per_worker",
    "train.sync_bn",
    "train.amp",
    "train.amp_dtype",
    "model.norm",
    "model.pretrained_backbone",
    "model.trainable_backbone_layers",
    "model.detector",
    "model.backbone",
    "model.min_size",
    "model.max_size",
)


def choose_packing(res: TrialResources, exp: ExperimentConfig, searched: set[str] | None = None) -> Packing:
    """`pack: auto`: the layout the trials train with (`pisa.planning.packing`). The given one is
    kept on CPUs, with a normalisation that depends on the split, when the search varies what
    the layout is decided on, or without memory figures."""
    searched = searched or set()
    given = Layout(res.workers, exp.train.images_per_worker, res.gpus_per_worker)
    if not res.gpus_per_worker:
        return keep(given, "the workers train on CPUs (gpus_per_worker: 0); packing fits trials into GPU memory")
    varied = [key for key in LAYOUT_KEYS if key in searched]
    if varied:
        return keep(given, f"the search varies {', '.join(varied)}, which the layout is chosen on")
    equivalent, why = layout_free_norm(exp.model, exp.train.sync_bn)
    if not equivalent:
        return keep(given, why)
    memory, unknown = gpu_memory(res, exp)
    if memory is None:
        return keep(given, unknown)
    return pack(given, memory, why_equivalent=why, per_worker=per_worker_losses(exp.model, searched))


def gpu_memory(res: TrialResources, exp: ExperimentConfig) -> tuple[GpuMemory | None, str]:
    """The memory figures packing needs: the study file's, else a probe on this machine's GPU;
    (None, why) when there are none."""
    from ..training import probe  # torch: imported by the calls below only

    if res.gpu_mem_per_image_gib is not None:
        card = res.gpu_mem_gib or probe.local_gpu_gib()
        if card is None:
            return None, (
                "the GPUs' memory is unknown: give resources_per_trial.gpu_mem_gib "
                "(or start the study on a GPU machine)"
            )
        return GpuMemory(card, res.gpu_mem_per_image_gib, WORKER_OVERHEAD_GIB, "gpu_mem_per_image_gib"), ""
    if probe.local_gpu_gib() is None:
        return None, (
            "the GPU memory per image is unknown: give resources_per_trial.gpu_mem_per_image_gib and "
            "gpu_mem_gib, or start the study on a machine with the cluster's GPU (a probe measures it)"
        )
    say("pack: auto: measuring the GPU memory per image (a few training steps on this machine's GPU)")
    try:
        found = probe.probe_gpu_memory(exp)
    except Exception as exc:  # no figures is a kept layout, never a failed study
        return None, f"the GPU memory probe failed: {one_line(exc)}"
    if found.per_image_gib is None:
        too_many = found.sizes[1]
        return None, f"{too_many} images per worker do not fit the probe's {found.card_gib:.0f} GiB {found.device}"
    card = res.gpu_mem_gib or found.card_gib
    return GpuMemory(card, found.per_image_gib, found.overhead_gib, f"a probe on {found.device}"), ""


def _packed_study(cfg: StudyConfig, packing: Packing) -> StudyConfig:
    """The study with the chosen layout; as many more trials at a time as fit the GPUs the given
    layout would have held (`max_concurrent_trials` counts given-layout trials)."""
    if not packing.packed:
        return cfg
    chosen = packing.chosen
    res = cfg.resources_per_trial.model_copy(
        update={"workers": chosen.workers, "images_per_worker": chosen.images_per_worker}
    )
    at_once = cfg.max_concurrent_trials * max(1, packing.trials_per_node)
    return cfg.model_copy(update={"resources_per_trial": res, "max_concurrent_trials": at_once})
