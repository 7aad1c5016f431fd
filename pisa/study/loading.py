"""Loading and checking a study file before anything starts.

Every value the search can produce is checked against the training config's own
schema (bounds of k, b, lr, the sampler names...), so a bad range fails here, with the
study file and the field named, not in trial 7 an hour later.
"""

from __future__ import annotations

import copy
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
from ..core.errors import ConfigError
from .schema import BASELINE, PAPER_DEFAULTS, StudyConfig


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
    """A validated study: its config, the resolved base experiment dict, its source file."""

    def __init__(self, cfg: StudyConfig, base: dict[str, Any], source: Path, overrides: list[str] | None = None):
        self.cfg = cfg
        self.base = base  # an ExperimentConfig dump, paths absolute: trials set dotted keys in copies of it
        self.base_config = ExperimentConfig.model_validate(base)  # the same, typed, for everything that reads it
        self.source = source
        self.overrides = list(overrides or [])  # `--set` items, kept with the study's state

    def with_tracking_uri(self, uri: str) -> Study:
        """This study logging to `uri` (a resumed study keeps the store it started with)."""
        base = copy.deepcopy(self.base)
        base["tracking"]["uri"] = uri
        return Study(self.cfg, base, self.source, self.overrides)

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
        """The seeds every point trains with: the base config's `train.seed` and the next ones."""
        first = self.base_config.train.seed
        return list(range(first, first + self.cfg.seeds))

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
        raise ConfigError(format_validation_error(exc, str(path))) from None

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
    # trial resources come from the study, not the base config
    set_dotted(base, "train.workers", cfg.resources_per_trial.workers)
    set_dotted(base, "train.use_gpu", cfg.resources_per_trial.gpus_per_worker > 0)
    set_dotted(base, "train.cpus_per_worker", cfg.resources_per_trial.cpus_per_worker)
    if cfg.resources_per_trial.resources_per_worker:
        set_dotted(base, "train.resources_per_worker", cfg.resources_per_trial.resources_per_worker)
    if cfg.resources_per_trial.gpus_per_worker > 0:
        set_dotted(base, "train.gpus_per_worker", cfg.resources_per_trial.gpus_per_worker)
    resolved = parse_config(base, source=f"{path} (experiment)")
    base = resolved.model_dump(mode="json")
    study = Study(cfg, base, path, overrides)

    # every admissible extreme of the space must give a valid training config
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
    return study
