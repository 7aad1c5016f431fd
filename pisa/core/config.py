"""Validated configuration: one pydantic model per concern, defaults from the paper.

A training config (`ExperimentConfig`) is what one Ray Train run needs; a study
(`pisa.search.study.Study`) wraps one with a search space. Relative paths are resolved
against the directory the YAML file was loaded from's working directory at load time,
because Ray workers run in other working directories.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from .errors import ConfigError
from .model_config import (
    BoxLossConfig,
    CARLConfig,
    ISRNConfig,
    ISRPConfig,
    ModelConfig,
    RoIAlignConfig,
    StrictModel,
)
from .schedule import SCHEDULES, Schedule
from .storage import normalize
from .uris import public_uri

__all__ = [
    "ConfigError",
    "StrictModel",
    "ISRPConfig",
    "ISRNConfig",
    "CARLConfig",
    "BoxLossConfig",
    "RoIAlignConfig",
    "ModelConfig",
    "SyntheticConfig",
    "DataConfig",
    "TrainConfig",
    "TrackingConfig",
    "ExperimentConfig",
    "ReferenceConfig",
    "load_yaml",
    "apply_overrides",
    "load_config",
    "parse_config",
    "flatten",
    "format_validation_error",
]


class SyntheticConfig(StrictModel):
    """Generate the synthetic COCO dataset into `out` if it is missing."""

    out: Path
    train: int = Field(64, ge=1)
    val: int = Field(16, ge=1)
    seed: int = 0
    image_size: int = Field(128, ge=32)


class DataConfig(StrictModel):
    """A COCO-format dataset: image folders and annotation JSON files."""

    train_images: Path | None = None
    train_annotations: Path | None = None
    val_images: Path | None = None
    val_annotations: Path | None = None
    synthetic: SyntheticConfig | None = Field(
        None, description="if set, the four paths default to the generated dataset"
    )
    bad_boxes: Literal["error", "skip"] = "error"
    flip_prob: float = Field(0.5, ge=0, le=1)
    augment: Literal["flip", "ssd"] = Field(
        "flip",
        description="training augmentation: flip only, or SSD's photometric distortion + zoom-out "
        "+ min-IoU crop + flip",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per Ray worker")
    group_by_aspect_ratio: bool = Field(
        True,
        description="fill each global batch with images of one orientation (width > height or not), "
        "as mmdetection's group sampler: less padding (pisa.data.grouping)",
    )
    val_limit: int | None = Field(None, ge=1, description="evaluate on the first N val images only")
    train_limit: int | None = Field(None, ge=1, description="train on the first N train images only")
    skip_empty_train: bool = Field(
        True,
        description="leave training images without annotations out (mmdetection's filter_empty_gt); "
        "validation keeps every image",
    )

    @model_validator(mode="after")
    def _fill_from_synthetic(self) -> DataConfig:
        if self.synthetic is not None:
            out = self.synthetic.out
            defaults = {
                "train_images": out / "train",
                "train_annotations": out / "train.json",
                "val_images": out / "val",
                "val_annotations": out / "val.json",
            }
            for key, value in defaults.items():
                if getattr(self, key) is None:
                    object.__setattr__(self, key, value)
        missing = [
            k
            for k in ("train_images", "train_annotations", "val_images", "val_annotations")
            if getattr(self, k) is None
        ]
        if missing:
            raise ValueError(f"missing {', '.join(missing)} (or set 'synthetic')")
        return self


ScheduleName = Literal["1x", "2x", "ssd", "custom"]


class TrainConfig(StrictModel):
    """Schedule and scaling. `schedule` picks a paper preset; other fields override it."""

    schedule: ScheduleName = "1x"
    epochs: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0, description="LR at base_batch; scaled linearly to the real batch")
    base_batch: int | None = Field(None, ge=1)
    milestones: list[int] | None = None
    gamma: float = Field(0.1, gt=0, le=1)
    momentum: float | None = Field(None, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0)
    decay_norm_and_bias: bool = Field(
        False,
        description="weight decay on every parameter, biases and norm scales included (mmdetection's "
        "SGD without paramwise_cfg); false: none on 1-D parameters",
    )
    warmup_iters: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, gt=0, le=1)
    grad_clip: float | None = Field(None, gt=0)
    workers: int = Field(8, ge=1, description="Ray Train workers")
    use_gpu: bool = True
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per worker when use_gpu (fractions share one)")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources per worker, e.g. a node label {node_a: 0.01}"
    )
    images_per_worker: int = Field(2, ge=1)
    amp: bool | Literal["auto"] = Field(
        "auto", description="mixed precision: auto = on GPU only; true = on CPU too (bfloat16 there)"
    )
    amp_dtype: Literal["auto", "float16", "bfloat16"] = Field(
        "auto",
        description="autocast dtype: auto = bfloat16 where the device has it (CPU, GPUs from Ampere on), "
        "else float16 + GradScaler",
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="channels_last memory format: auto = on GPU only; true = on CPU too"
    )
    sync_bn: bool = Field(True, description="SyncBatchNorm for trainable BN in multi-GPU training")
    seed: int = 0
    log_every: int = Field(20, ge=1)
    max_failures: int = Field(
        3, ge=-1, description="restarts of the worker group from the last checkpoint after a lost worker (-1: no limit)"
    )
    keep_checkpoints: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainConfig:
        if self.schedule == "custom":
            for key in ("epochs", "lr"):
                if getattr(self, key) is None:
                    raise ValueError(f"schedule 'custom' needs '{key}'")
        return self

    def resolved(self) -> Schedule:
        """The effective schedule: the preset with this config's overrides applied."""
        out = dict(SCHEDULES.get(self.schedule, SCHEDULES["1x"]))
        if self.schedule == "custom":
            out["milestones"] = []
        for key in (
            "epochs",
            "lr",
            "base_batch",
            "milestones",
            "momentum",
            "weight_decay",
            "warmup_iters",
            "warmup_ratio",
        ):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out["milestones"] = tuple(out["milestones"])
        return Schedule(
            **out,
            gamma=self.gamma,
            total_batch=self.workers * self.images_per_worker,
            decay_norm_and_bias=self.decay_norm_and_bias,
        )


class TrackingConfig(StrictModel):
    """Where MLflow logs. None: $MLFLOW_TRACKING_URI, else a SQLite file in the working dir."""

    uri: str | None = None
    experiment: str = "pisa"
    log_checkpoint: bool = True
    system_metrics_interval_s: float = Field(
        10.0, ge=0, description="MLflow system metrics (CPU, memory, GPU) sampling interval; 0 = off"
    )

    def resolved_uri(self) -> str:
        if self.uri:
            return self.uri
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class ReferenceConfig(StrictModel):
    """The published result a config reproduces: `pisa paper` prints it beside what was
    trained. A PISA config names its baseline config (a file in the same directory). A set-up
    the reference ships without a result (Mask R-CNN X-101 PISA) says `published: false`."""

    row: str = Field(description="the paper table's row this config belongs to, e.g. faster_rcnn_r50")
    source: str = Field(description="where the numbers and the set-up come from")
    published: bool = Field(True, description="false: the reference publishes no metrics for this set-up")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="the reference's final metrics, e.g. {bbox_mAP: 0.384}"
    )
    baseline: str | None = Field(None, description="for a PISA config: its baseline config's file name")
    budget: str = Field("COCO 2017 train, 12 epochs", description="what the reference trained on, for how long")

    @model_validator(mode="after")
    def _metrics_or_unpublished(self) -> ReferenceConfig:
        if self.published and not self.metrics:
            raise ValueError("metrics: give the published metrics, or published: false if there are none")
        if not self.published and self.metrics:
            raise ValueError("metrics: a set-up with published: false has no metrics")
        return self


class ExperimentConfig(StrictModel):
    """One training run: detector + data + schedule + tracking."""

    name: str = "pisa"
    model: ModelConfig = ModelConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage_path: str = Field(
        "ray_results",
        description="Ray checkpoints and study state: a directory "
        "or a pyarrow.fs URI (s3://bucket/path, gs://..., file://...)",
    )
    reference: ReferenceConfig | None = None

    def to_yaml(self) -> str:
        """The config as logged (`config.yaml`): credentials come from the environment,
        never from a file, so the tracking URI goes without them."""
        data = self.model_dump(mode="json")
        if data["tracking"]["uri"]:
            data["tracking"]["uri"] = public_uri(data["tracking"]["uri"])
        return yaml.safe_dump(data, sort_keys=False)

    def resolve_paths(self, base: Path | None = None) -> ExperimentConfig:
        """Absolute paths everywhere (Ray workers run in another working directory)."""
        base = Path(base or Path.cwd())

        def fix(p: Path | None) -> Path | None:
            if p is None:
                return None
            p = Path(os.path.expanduser(str(p)))
            return p if p.is_absolute() else (base / p).resolve()

        data = self.data.model_copy()
        for key in ("train_images", "train_annotations", "val_images", "val_annotations"):
            object.__setattr__(data, key, fix(getattr(data, key)))
        if data.synthetic is not None:
            syn = data.synthetic.model_copy()
            object.__setattr__(syn, "out", fix(syn.out))
            object.__setattr__(data, "synthetic", syn)
        out = self.model_copy(update={"data": data, "storage_path": normalize(self.storage_path, base)})
        tracking = out.tracking
        if tracking.uri and tracking.uri.startswith("sqlite:///") and not tracking.uri.startswith("sqlite:////"):
            rel = tracking.uri[len("sqlite:///") :]
            out = out.model_copy(
                update={"tracking": tracking.model_copy(update={"uri": f"sqlite:///{fix(Path(rel))}"})}
            )
        if out.model.pretrained_backbone and (out.model.pretrained_backbone.endswith((".pth", ".pt"))):
            out = out.model_copy(
                update={
                    "model": out.model.model_copy(
                        update={"pretrained_backbone": str(fix(Path(out.model.pretrained_backbone)))}
                    )
                }
            )
        return out

    def flat_params(self) -> dict[str, Any]:
        """The whole config flattened to dotted keys (MLflow params); the published reference
        is not a parameter of the training (it stays in the logged config.yaml)."""
        return flatten(self.model_dump(mode="json", exclude={"reference"}))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------- loading


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely; errors name the file and line."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (undecodable byte at offset {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars (1e-3, true, [8, 11])."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        set_dotted(data, key.strip(), value)
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts, creating sections on the way."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{part}' in {key!r} is not a config section")
        node = child
    node[parts[-1]] = value


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config ({exc.error_count()} error{'s' if exc.error_count() > 1 else ''})"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, override and validate a training config; paths come back absolute."""
    data = apply_overrides(load_yaml(path), overrides)
    return parse_config(data, source=str(path))


def parse_config(data: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    return cfg.resolve_paths()
