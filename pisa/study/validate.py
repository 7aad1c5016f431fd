"""`pisa study validate`: re-check a study's top points against the baseline and the paper's
defaults over the same N seeds, and say how sure the comparison is.

A study ranks points by one value each (or a mean over a few seeds), and the best of many
noisy values is optimistic: the winner is partly the luckiest. Validation trains every
variant again, with seeds the study did not use (by default), all variants on the same
seeds, as many trainings side by side as the study ran (each with its trial resources), and compares the
final-epoch metric: mean, standard deviation, t-interval per variant, and the paired
difference to the baseline per seed (`pisa.core.stats`). Everything is logged to one MLflow run
linked to the study (tag `pisa.study_run_id`; the study's run gets `pisa.validation_run_id`),
with the trainings nested under it.
"""

from __future__ import annotations

import csv
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import tracking
from ..core.errors import ConfigError
from ..core.progress import say
from ..core.stats import Paired, Summary, paired, summarize
from ..core.storage import join
from ..tracking import tags as tag
from ..tracking.tags import Kind, RunStatus, Status
from ..training.cluster import check_cluster_setup
from ..training.ray_runtime import quiet_libraries
from .layout import study_dir
from .resources import trainings_that_fit, trial_resources
from .results import outcome_from_state
from .schema import BASELINE, PAPER_DEFAULTS
from .state import StudyState, load_state, study_from_state
from .training_grid import GridTraining, slug, train_grid
from .trial import trains_in_trial

if TYPE_CHECKING:
    from ..training.train import TrainOutcome


@dataclass
class Variant:
    """One configuration to train: the study's base with `params` set."""

    label: str
    params: dict[str, Any]
    trial_run_id: str | None = None


@dataclass
class VariantResult:
    variant: Variant
    values: dict[int, float] = field(default_factory=dict)  # seed -> final-epoch metric
    failed: dict[int, str] = field(default_factory=dict)  # seed -> error
    run_ids: dict[int, str | None] = field(default_factory=dict)
    summary: Summary | None = None
    vs_baseline: Paired | None = None  # None for the baseline itself

    def add(self, seed: int, out: TrainOutcome, metric: str) -> None:
        """One seed's training: its final `metric`, or why it has none."""
        value = out.metrics.get(metric)
        if out.status == RunStatus.FINISHED and isinstance(value, (int, float)):
            self.values[seed], self.run_ids[seed] = float(value), out.run_id
        else:
            self.failed[seed] = out.error or "no metric"


@dataclass
class Validation:
    study: str
    metric: str
    mode: str
    seeds: list[int]
    results: list[VariantResult]
    run_id: str | None = None
    tracking_uri: str | None = None

    @property
    def ok(self) -> bool:
        return all(not r.failed for r in self.results)


def plan(study, outcome, top: int) -> list[Variant]:
    """Baseline, paper defaults, then the top `top` trials; a trial whose training config
    equals the baseline's or the paper's is trained once, under both labels."""
    ranked = [t for t in outcome.trials if t.status != Status.FAILED and t.metric is not None]
    if top > len(ranked):
        raise ConfigError(f"--top {top}: study {outcome.name!r} has only {len(ranked)} ranked trial(s)")
    variants = [Variant("baseline", dict(BASELINE)), Variant("paper defaults", dict(PAPER_DEFAULTS))]
    configs = [_config_key(study, v.params) for v in variants]
    space = study.cfg.search_space
    for rank, trial in enumerate(ranked[:top], 1):
        params = {
            k: space[k].parse_logged(v) if k in space and isinstance(v, str) else v for k, v in trial.params.items()
        }
        key = _config_key(study, params)
        label = f"#{rank} {trial.trial_id}"
        if key in configs:
            same = variants[configs.index(key)]
            same.label += f" = {label}"
            same.trial_run_id = same.trial_run_id or trial.run_id
            continue
        variants.append(Variant(label, params, trial.run_id))
        configs.append(key)
    return variants


def _config_key(study, params: dict[str, Any]) -> str:
    return study.experiment(params).model.model_dump_json()


def compare(results: list[VariantResult], mode: str, confidence: float = 0.95) -> None:
    """Fill each result's summary and its paired difference to the first (the baseline)."""
    base = results[0]
    for r in results:
        r.summary = summarize(list(r.values.values()), confidence)
        r.vs_baseline = None if r is base else paired(r.values, base.values, confidence, mode)


def validation_seeds(study, seeds: int, first_seed: int | None) -> list[int]:
    """`seeds` seeds, by default the ones after those the study trained with."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be at least 1 (2 or more for an interval)")
    start = first_seed if first_seed is not None else study.seeds()[-1] + 1
    return list(range(start, start + seeds))


def validate_study(
    name: str,
    *,
    top: int,
    seeds: int,
    storage_path: str | Path = "ray_results",
    first_seed: int | None = None,
    address: str | None = None,
    verbose: bool = False,
) -> Validation:
    """Train every variant on every seed (seed by seed), log and return the comparison.
    `verbose` shows the trainings' own output (otherwise in each trial's directory). Long
    because it checks every argument up front (one-line errors, nothing started) before
    the one call that trains."""
    from ..training.train import start_ray_with_data  # torch: the training's entry points

    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be at least 1 (2 or more for an interval)")
    if top < 0:
        raise ConfigError(f"--top {top}: must be 0 or more")
    state = load_state(name, storage_path)
    study = study_from_state(state)
    outcome = outcome_from_state(name, storage_path)
    variants = plan(study, outcome, top)
    seed_list = validation_seeds(study, seeds, first_seed)
    uri, metric, mode = state.tracking_uri, state.metric, state.mode
    check_cluster_setup(address, uri, study.base_config.storage_path, "study")
    tracking.check_reachable(uri)
    if not verbose:
        quiet_libraries()

    run_id = _start_run(state, top, seed_list, variants)
    results = [VariantResult(v) for v in variants]
    # seed-major: a validation cut short leaves complete pairs
    jobs = [(seed, r) for seed in seed_list for r in results]
    name = f"validation-{time.strftime('%Y%m%d-%H%M%S')}"
    trainings_dir = join(study_dir(study), name, "trainings")  # where multi-worker trainings checkpoint
    trainings = [_training(study, r.variant, seed, uri, state.name, trainings_dir) for seed, r in jobs]
    in_trial = trains_in_trial(study, seeds=1)
    num_classes = start_ray_with_data(study.base_config, uri, address, verbose=verbose, dashboard=not in_trial)
    parallel = trainings_at_once(study, len(jobs))
    say(f"{len(jobs)} trainings, {parallel} at a time")
    outcomes = train_grid(
        trainings,
        uri=uri,
        parent_run_id=run_id,
        storage_path=study_dir(study),
        name=name,
        in_trial=in_trial,
        resources=trial_resources(study, in_trial=in_trial),
        concurrent=parallel,
        max_failures=study.cfg.max_failures,
        score=(metric, mode),
        num_classes=num_classes,
    )
    for (seed, r), out in zip(jobs, outcomes):
        r.add(seed, out, metric)
    compare(results, mode)
    validation = Validation(state.name, metric, mode, seed_list, results, run_id, uri)
    log_validation(validation)
    tracking.tracker(uri).end_run(run_id, RunStatus.FINISHED if validation.ok else RunStatus.FAILED)
    return validation


def _start_run(state: StudyState, top: int, seed_list: list[int], variants: list[Variant]) -> str:
    """The validation's own MLflow run, linked with the study's run both ways; announced."""
    run_id = tracking.tracker(state.tracking_uri).start_run(
        state.experiment,
        f"validate {state.name}",
        params={
            "top": top,
            "seeds": json.dumps(seed_list),
            "metric": state.metric,
            "variants": json.dumps([v.label for v in variants]),
        },
        tags={tag.KIND: Kind.VALIDATION, tag.STUDY: state.name, tag.STUDY_RUN_ID: state.parent_run_id},
    )
    tracking.tracker(state.tracking_uri).set_tags(state.parent_run_id, {tag.VALIDATION_RUN_ID: run_id})
    say(
        f"validating study {state.name}: {len(variants)} variants x seeds {seed_list}, "
        f"final-epoch {state.metric}; MLflow run {run_id}"
    )
    return run_id


def _training(study, variant: Variant, seed: int, uri: str, study_name: str, storage_path: str) -> GridTraining:
    """The study's base config with the variant's params and the seed, tracked in `uri`."""
    exp = study.experiment(variant.params)
    exp = exp.model_copy(
        update={
            "train": exp.train.model_copy(update={"seed": seed}),
            "tracking": exp.tracking.model_copy(update={"uri": uri}),
            "storage_path": storage_path,
        }
    )
    tags = {
        tag.KIND: Kind.VALIDATION_TRAINING,
        tag.STUDY: study_name,
        tag.VARIANT: variant.label,
        tag.SEED: str(seed),
    }
    return GridTraining(exp, f"{slug(variant.label)} seed {seed}", tags)


def trainings_at_once(study, jobs: int) -> int:
    """As many trainings side by side as the study ran at its busiest (points x seeds) and the
    Ray cluster has CPUs (GPUs) for."""
    return max(1, min(jobs, trainings_that_fit(study), study.cfg.max_concurrent_trials * study.cfg.seeds))


# ---------------------------------------------------------------- output


def _num(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _ci(s: Summary | None, signed: bool = False) -> str:
    if s is None or s.ci_low is None:
        return "-"
    return f"[{_num(s.ci_low, signed)}, {_num(s.ci_high, signed)}]"


def verdict(p: Paired | None, mode: str) -> str:
    if p is None:
        return "reference"
    d = p.difference
    if d.ci_low is None:
        return "too few seeds"
    if not p.significant:
        return "no significant difference"
    better = d.ci_low > 0 if mode == "max" else d.ci_high is not None and d.ci_high < 0
    return "better" if better else "worse"


def table_rows(v: Validation) -> list[dict[str, Any]]:
    rows = []
    for r in v.results:
        s, p = r.summary, r.vs_baseline
        rows.append(
            {
                "variant": r.variant.label,
                "seeds": s.n if s else 0,
                "mean": s.mean if s else None,
                "std": s.std if s else None,
                "ci_low": s.ci_low if s else None,
                "ci_high": s.ci_high if s else None,
                "diff_mean": p.difference.mean if p else None,
                "diff_std": p.difference.std if p else None,
                "diff_ci_low": p.difference.ci_low if p else None,
                "diff_ci_high": p.difference.ci_high if p else None,
                "paired_seeds": len(p.seeds) if p else None,
                "wins": p.wins if p else None,
                "losses": p.losses if p else None,
                "verdict": verdict(p, v.mode),
                "failed_seeds": ",".join(map(str, sorted(r.failed))),
                "params": json.dumps(r.variant.params, sort_keys=True, default=str),
            }
        )
    return rows


def format_validation(v: Validation) -> str:
    """The comparison as a plain-text table (what `pisa study validate` prints)."""
    import io

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"study {v.study}: final-epoch {v.metric} over seeds {v.seeds} (95% t-intervals)")
    for col in (
        "variant",
        "n",
        "mean",
        "std",
        "95% CI",
        "paired diff vs baseline",
        "95% CI of diff",
        "wins",
        "verdict",
    ):
        table.add_column(col)
    for r in v.results:
        s, p = r.summary, r.vs_baseline
        table.add_row(
            r.variant.label + (f" ({len(r.failed)} failed)" if r.failed else ""),
            str(s.n if s else 0),
            _num(s.mean if s else None),
            _num(s.std if s else None),
            _ci(s),
            _num(p.difference.mean, True) if p else "-",
            _ci(p.difference, True) if p else "-",
            f"{p.wins}/{len(p.seeds)}" if p else "-",
            verdict(p, v.mode),
        )
    buf = io.StringIO()
    Console(file=buf, width=200, force_terminal=False, color_system=None).print(table)
    note = (
        "A variant is better or worse only when the interval of its paired difference excludes 0; "
        "otherwise the gap is within the seed-to-seed noise at this budget."
    )
    return buf.getvalue() + note + "\n"


def write_plot(v: Validation, path: Path) -> Path:
    """Per-seed values per variant: a box per variant with every seed as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.variant.label for r in v.results]
    data = [[r.values[s] for s in sorted(r.values)] for r in v.results]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(labels)), 3.6))
    ax.boxplot([d if d else [float("nan")] for d in data], widths=0.5, showmeans=True)
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(v.results, 1):
        for j, seed in enumerate(v.seeds):
            if seed in r.values:
                ax.scatter(
                    i + (j - (len(v.seeds) - 1) / 2) * 0.05,
                    r.values[seed],
                    color=cmap(j % 10),
                    s=22,
                    zorder=3,
                    label=f"seed {seed}" if i == 1 else None,
                )
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(f"final-epoch {v.metric}")
    ax.set_title(f"{v.study}: {v.metric} per seed")
    if v.seeds:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_validation(v: Validation) -> None:
    """The table (text, CSV, JSON), per-seed values and the plot, on the validation run."""
    if not v.run_id or not v.tracking_uri:
        return
    rows = table_rows(v)
    metrics: dict[str, float] = {}
    for r, row in zip(v.results, rows):
        name = slug(r.variant.label.split(" = ")[0])
        for key in ("mean", "std", "ci_low", "ci_high", "diff_mean", "diff_ci_low", "diff_ci_high", "wins"):
            if row[key] is not None:
                metrics[f"{name}.{key}"] = row[key]
    tracking.tracker(v.tracking_uri).log_metrics(v.run_id, metrics, step=0)
    with tempfile.TemporaryDirectory(prefix="pisa-validate-") as tmp:
        out = Path(tmp)
        (out / "validation.txt").write_text(format_validation(v))
        with (out / "validation.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        per_seed = [
            {
                "variant": r.variant.label,
                "seed": s,
                v.metric: r.values.get(s),
                "run_id": r.run_ids.get(s),
                "error": r.failed.get(s),
            }
            for s in v.seeds
            for r in v.results
        ]
        (out / "per_seed.json").write_text(json.dumps(per_seed, indent=2))
        files = [out / "validation.txt", out / "validation.csv", out / "per_seed.json"]
        try:
            files.append(write_plot(v, out / "per_seed.png"))
        except Exception as exc:  # a plot must never cost the results
            say(f"validation plot skipped: {exc}")
        tracking.tracker(v.tracking_uri).log_artifacts(v.run_id, files, "validation")
