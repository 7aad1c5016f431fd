"""`pisa study best` and `pisa reproduce`: the best trial's config out, a rerun in.

A best-config file is a plain training config YAML with a comment header naming the
run it came from, so `pisa reproduce best.yaml` can link the new run to the original.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import tracking
from ..core.config import TrackingConfig, apply_overrides, load_config, parse_config
from ..core.errors import ConfigError
from ..tracking import tags as tag
from ..tracking.tags import Kind
from ..trials.seeds import seed_key

HEADER = re.compile(r"^# pisa-source: run_id=(?P<run>[0-9a-f]+) tracking_uri=(?P<uri>\S+)", re.M)
COMPARED = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "train_loss")


@dataclass(frozen=True)
class MetricComparison:
    key: str
    original: float | None
    reproduced: float | None

    @property
    def diff(self) -> float | None:
        if self.original is None or self.reproduced is None:
            return None
        return self.reproduced - self.original


@dataclass(frozen=True)
class ReproduceOutcome:
    """A rerun and how its metrics compare with the original run's at the same epoch."""

    run_id: str | None
    status: str
    original: str | None  # the original run's id, when known
    epoch: int | None  # the epoch compared at (None: each run's last)
    rows: list[MetricComparison] = field(default_factory=list)
    error: str | None = None


def run_config_text(uri: str, run_id: str) -> str:
    with tempfile.TemporaryDirectory(prefix="pisa-cfg-") as tmp:
        try:
            path = tracking.tracker(uri).download_artifact(run_id, "config.yaml", tmp)
        except Exception as exc:
            raise ConfigError(f"run {run_id} in {uri} has no config.yaml artifact ({exc})") from None
        return Path(path).read_text()


def write_best(uri: str, run_id: str, out: str | Path, metric: str, value: float | None) -> Path:
    text = run_config_text(uri, run_id)
    header = (
        f"# pisa-source: run_id={run_id} tracking_uri={uri}\n"
        f"# best trial of its study by {metric}: {value}\n"
        f"# reproduce with: pisa reproduce {Path(out).name}\n"
    )
    out = Path(out)
    out.write_text(header + text)
    return out


def _history_at(uri: str, run_id: str, key: str, step: int | None) -> float | None:
    hist = tracking.tracker(uri).metric_history(run_id, key)
    if not hist:
        return None
    if step is None:
        return max(hist, key=lambda m: (m.step, m.timestamp)).value
    at = [m for m in hist if m.step == step]
    return at[-1].value if at else None


def reproduce(
    source: str, *, tracking_uri: str | None = None, address: str | None = None, overrides: list[str] | None = None
) -> ReproduceOutcome:
    """Retrain a run's config (same seed) as a new, linked MLflow run; compare metrics."""
    from ..training.train import run_training  # torch: only when a training runs

    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        cfg = load_config(path, overrides)
        m = HEADER.search(path.read_text())
        original, uri = (m.group("run"), m.group("uri")) if m else (None, None)
    else:
        original = source
        uri = tracking_uri or TrackingConfig().resolved_uri()
        db = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else None
        if db is not None and not Path(db).exists():  # asking a missing SQLite store would make one
            raise ConfigError(f"run {original}: no MLflow store at {db} (give --tracking-uri or MLFLOW_TRACKING_URI)")
        data = apply_overrides(yaml.safe_load(run_config_text(uri, original)), overrides)
        cfg = parse_config(data, source=f"run {original}")
    tags: dict[str, str] = {tag.KIND: Kind.REPRODUCE}
    if original:
        tags.update({tag.REPRODUCES: original, tag.NOTE: f"Reproduction of run {original} ({uri})"})
    outcome = run_training(
        cfg, address=address, run_name=f"reproduce {original[:8] if original else path.stem}", tags=tags
    )
    rows = []
    new_uri = cfg.tracking.resolved_uri()
    epochs_orig = None
    if original and uri:
        run = tracking.tracker(uri).run(original)
        epochs_orig = int(run.data.metrics.get("epoch", 0)) or None
    # a multi-seed trial logs the seed mean; its own value for this seed is `seed_<S>/<key>`
    # (the study metric only): compare with that, and not with means of other metrics
    multi_seed = bool(
        original and uri and [k for k in tracking.tracker(uri).run(original).data.metrics if k.startswith("seed_")]
    )
    for key in COMPARED:
        new = _history_at(new_uri, outcome.run_id, key, epochs_orig) if outcome.run_id else None
        old = None
        if original and uri:
            old = _history_at(uri, original, seed_key(cfg.train.seed, key) if multi_seed else key, epochs_orig)
        if (new is None and old is None) or (multi_seed and old is None):
            continue
        rows.append(MetricComparison(key, old, new))
    return ReproduceOutcome(outcome.run_id, outcome.status, original, epochs_orig, rows, outcome.error)


def format_comparison(result: ReproduceOutcome) -> str:
    lines = [
        f"original run {result.original or '-'} vs reproduction {result.run_id} (at epoch {result.epoch or 'last'}):",
        f"  {'metric':<14}{'original':>12}{'reproduced':>12}{'diff':>12}",
    ]
    for row in result.rows:
        lines.append(f"  {row.key:<14}{_f(row.original):>12}{_f(row.reproduced):>12}{_f(row.diff):>12}")
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
