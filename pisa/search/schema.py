"""The study file's schema: the search space, the search settings, the trial resources,
and the points every study evaluates first (the paper's defaults and the baseline).

Loading and checking a study file against its training config is `pisa.search.study`'s job.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..core.config import StrictModel

# The paper's PISA defaults, evaluated first in every study (`points_to_evaluate: paper`).
PAPER_DEFAULTS: dict[str, Any] = {
    "model.isr_p.enabled": True,
    "model.isr_p.k": 2.0,
    "model.isr_p.bias": 0.0,
    "model.carl.enabled": True,
    "model.carl.k": 1.0,
    "model.carl.bias": 0.2,
    "model.isr_n.k": 0.5,
    "model.isr_n.bias": 0.0,
    "model.sampler": "score_hlr",
}
# The baseline: PISA off (`points_to_evaluate: paper+baseline`).
BASELINE: dict[str, Any] = {
    "model.isr_p.enabled": False,
    "model.carl.enabled": False,
    "model.sampler": "random",
}


# Search distributions. Each knows its Tune domain, its Optuna distribution, the values a
# study checks before it starts, and which values it can produce.


class _Range(StrictModel):
    """A numeric range: `low` < `high` (the subclasses declare their types)."""

    low: Any
    high: Any

    @model_validator(mode="after")
    def _order(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self

    def optuna_value(self, value: Any) -> Any:
        """`value` as this distribution's Optuna counterpart holds it."""
        return value


class Uniform(_Range):
    type: Literal["uniform"]
    low: float
    high: float

    def parse_logged(self, text: str) -> Any:
        """A value as MLflow gave it back (params are strings)."""
        return float(text)

    def tune_domain(self) -> Any:
        from ray import tune

        return tune.uniform(self.low, self.high)

    def optuna_distribution(self) -> Any:
        import optuna

        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.type == "loguniform")

    def extremes(self) -> list[Any]:
        """The values a study validates before it starts: both ends and the middle."""
        return [self.low, (self.low + self.high) / 2, self.high]

    def closest(self, value: Any) -> Any:
        """`value` if this can produce it, else the closest value it can (the middle for non-numbers)."""
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            value = (self.low + self.high) / 2
        return float(min(max(value, self.low), self.high))

    def why_not(self, value: Any) -> str | None:
        """Why this can't produce `value` (a point Optuna would silently clamp), or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"is not a number (search space {self.type} [{self.low}, {self.high}])"
        if not self.low <= value <= self.high:
            return f"is outside the search space {self.type} [{self.low}, {self.high}]"
        return None


class LogUniform(Uniform):
    type: Literal["loguniform"]  # type: ignore[assignment]

    @model_validator(mode="after")
    def _positive(self):
        if self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self

    def tune_domain(self) -> Any:
        from ray import tune

        return tune.loguniform(self.low, self.high)

    def extremes(self) -> list[Any]:
        return [self.low, math.sqrt(self.low * self.high), self.high]


class IntRange(_Range):
    type: Literal["int"]
    low: int
    high: int

    def parse_logged(self, text: str) -> Any:
        return int(float(text))

    def tune_domain(self) -> Any:
        from ray import tune

        return tune.randint(self.low, self.high + 1)  # Tune's upper bound is exclusive

    def optuna_distribution(self) -> Any:
        import optuna

        return optuna.distributions.IntDistribution(self.low, self.high)

    def extremes(self) -> list[Any]:
        return [self.low, self.high]

    def closest(self, value: Any) -> Any:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            value = self.low
        return int(min(max(value, self.low), self.high))

    def why_not(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"is not a number (search space int [{self.low}, {self.high}])"
        if value != int(value):
            return f"is not an integer (search space int [{self.low}, {self.high}])"
        if not self.low <= value <= self.high:
            return f"is outside the search space int [{self.low}, {self.high}]"
        return None


class Choice(StrictModel):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)

    def tune_domain(self) -> Any:
        from ray import tune

        return tune.choice(self.values)

    def optuna_distribution(self) -> Any:
        import optuna

        # as strings: any YAML value (a list, None) is then a valid Optuna category
        return optuna.distributions.CategoricalDistribution([str(v) for v in self.values])

    def extremes(self) -> list[Any]:
        return list(self.values)

    def closest(self, value: Any) -> Any:
        return value if value in self.values else self.values[0]

    def why_not(self, value: Any) -> str | None:
        return None if value in self.values else f"is not one of {self.values}"

    def parse_logged(self, text: str) -> Any:
        """The choice whose text MLflow logged (`True`, `score_hlr`, `[8, 11]`)."""
        return next((v for v in self.values if str(v) == text), text)

    def optuna_value(self, value: Any) -> Any:
        return str(value)  # the categories are strings (`optuna_distribution`)


Distribution = Annotated[Uniform | LogUniform | IntRange | Choice, Field(discriminator="type")]


class SchedulerConfig(StrictModel):
    """ASHA stops weak trials early (by epoch); FIFO runs every trial to the end."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SearcherConfig(StrictModel):
    """How Optuna proposes points (`pisa.search.samplers`). A sampler learns only after its
    start-up points: Optuna's TPE default (10) is more than a small study's whole budget."""

    sampler: Literal["tpe", "gp", "qmc", "random"] = "tpe"
    startup_trials: int | None = Field(
        None, ge=0, description="random points before the model proposes (None: a quarter of num_samples, at least 2)"
    )


class ValidationStage(StrictModel):
    """The study's last stage: its top points, the paper's defaults and the baseline trained
    again on fresh seeds, and the verdict against the paper's defaults."""

    top: int = Field(1, ge=1, description="the study's best points to train again")
    seeds: int = Field(3, ge=2, description="fresh seeds each (2 or more: an interval needs them)")


class Racing(StrictModel):
    """Seed racing (`pisa.search.racing`): a point trains `min_seeds` seeds side by side, then
    one more at a time while it can still beat the best finished point on the seeds both
    trained (a one-sided paired t-test at `confidence`), up to `max_seeds`."""

    min_seeds: int = Field(2, ge=2, description="the first batch (2 or more: a paired test needs them)")
    max_seeds: int = Field(4, ge=2, description="seeds of a point that is never behind")
    confidence: float = Field(0.8, gt=0.5, lt=1.0, description="one-sided: a point is stopped when worse at this level")

    @field_validator("max_seeds")
    @classmethod
    def _at_least_min(cls, v: int, info: ValidationInfo) -> int:
        first = info.data.get("min_seeds")
        if first is not None and v < first:
            raise ValueError(f"{v} is less than min_seeds ({first})")
        return v


class Budget(StrictModel):
    """What the study may spend (`pisa.search.budget`): no trial starts that it cannot pay to
    `max_t` at the plan's rate, and running trials stop once it is spent."""

    hours: float = Field(
        gt=0, allow_inf_nan=False, description="GPU-hours (CPU-hours for CPU trials): epoch times x resources"
    )


class TrialResources(StrictModel):
    """What one trial trains on. `workers` x `images_per_worker` is the total batch the LR is
    scaled to; `pack: auto` may train it on fewer workers, each with more images
    (`pisa.planning.packing`)."""

    workers: int = Field(8, ge=1, description="Ray Train workers per trial")
    images_per_worker: int | None = Field(
        None, ge=1, description="sets the base config's train.images_per_worker (None: the base config's)"
    )
    gpus_per_worker: float = Field(1.0, ge=0, description="0: CPU workers; fractions share a GPU")
    cpus_per_worker: float = Field(1.0, gt=0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per worker (e.g. a node or accelerator label)"
    )
    pack: Literal["auto"] | None = Field(
        None,
        description="auto: the same total batch on the fewest GPUs whose memory holds it, when the "
        "model's normalisation does not depend on the split; None: the layout as given",
    )
    gpu_mem_per_image_gib: float | None = Field(
        None, gt=0, description="pack: GPU memory a training image needs (None: probed on this machine's GPU)"
    )
    gpu_mem_gib: float | None = Field(
        None, gt=0, description="pack: memory of one of the cluster's GPUs (None: this machine's first GPU)"
    )


class StudyConfig(StrictModel):
    """A base training config + a search space + the search settings."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base: Path | None = Field(None, description="training config YAML, relative to the study file")
    experiment: dict[str, Any] = Field(default_factory=dict, description="inline config / overrides of base")
    search_space: dict[str, Distribution] = Field(min_length=1)
    metric: str = "bbox_mAP"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    resources_per_trial: TrialResources = TrialResources()
    scheduler: SchedulerConfig = SchedulerConfig()
    searcher: SearcherConfig = SearcherConfig()
    validation: ValidationStage | None = Field(None, description="after the search: its answer over fresh seeds")
    racing: Racing | None = Field(None, description="seeds per point raced against the best finished point")
    budget: Budget | None = Field(None, description="GPU- (CPU-) hours the study may spend")
    seed: int = 0
    points_to_evaluate: Literal["paper", "paper+baseline", "none"] | list[dict[str, Any]] = "paper"
    max_failures: int = Field(3, ge=0, description="retries of a crashed trial, from its last checkpoint")
    seeds: int = Field(
        1, ge=1, description="trainings per point, seeds train.seed, +1, ...; the trial's metric is their mean"
    )
    optuna_storage: str | None = Field(
        None, description="Optuna RDB URL (default: optuna.db beside a SQLite MLflow store, else in storage_path)"
    )
    trial_process: Literal["auto", "ray_train"] = Field(
        "auto",
        description="auto: a 1-worker trial trains in its Tune trial's own process (fast "
        "start), more workers use Ray Train; ray_train: every trial is a Ray Train run",
    )

    @field_validator("search_space")
    @classmethod
    def _keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if not key or any(not part.isidentifier() for part in key.split(".")):
                raise ValueError(f"search_space key {key!r} is not a dotted config field")
        return v
