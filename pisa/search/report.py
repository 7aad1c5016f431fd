"""Plots and tables of a study: trials table, Optuna parameter importances, k-b contours,
rung fidelity (`pisa.search.fidelity`).

The Optuna study is rebuilt from the MLflow trials (their searched params and best
metric), so a report can be made again at any time, e.g. `pisa study report NAME`.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .. import tracking
from ..core.progress import say
from ..tracking import tags as tag
from ..tracking.tags import Status
from .fidelity import Fidelity
from .results import fidelity_of

CONTOUR_PAIRS = [
    ("model.isr_p.k", "model.isr_p.bias"),
    ("model.carl.k", "model.carl.bias"),
    ("model.isr_n.k", "model.isr_n.bias"),
]


def trials_rows(outcome) -> list[dict[str, Any]]:
    keys = sorted({k for t in outcome.trials for k in t.params})
    rows = []
    for rank, t in enumerate(outcome.trials, 1):
        row = {
            "rank": rank,
            "trial": t.trial_id,
            "status": t.status,
            "epochs": t.epochs,
            "metric": t.metric,
            "run_id": t.run_id,
        }
        row.update({k: t.params.get(k) for k in keys})
        if t.seed_values:
            row["seed_values"] = " ".join(f"{s}:{v:.6g}" for s, v in sorted(t.seed_values.items()))
        if t.error:
            row["error"] = t.error
        rows.append(row)
    return rows


def write_table(outcome, out_dir: Path) -> list[Path]:
    rows = trials_rows(outcome)
    fields = sorted(
        {k for r in rows for k in r}, key=lambda k: (list(rows[0]).index(k) if rows and k in rows[0] else 99, k)
    )
    csv_path = out_dir / "trials.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    html_path = out_dir / "trials.html"
    import pandas as pd

    pd.DataFrame(rows, columns=fields).to_html(html_path, index=False, float_format=lambda v: f"{v:.4f}")
    return [csv_path, html_path]


def optuna_study(outcome, study):
    """The finished trials as an Optuna study, for Optuna's own visualizations."""
    import optuna

    space = study.cfg.search_space
    dists = {key: dist.optuna_distribution() for key, dist in space.items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ostudy = optuna.create_study(direction=study.objective.direction)
    for t in outcome.trials:
        if t.status == Status.FAILED or t.metric is None or not math.isfinite(t.metric):
            continue
        params = {}
        for key in dists:
            raw = t.params.get(key)
            if raw is None:
                break
            params[key] = space[key].optuna_value(space[key].parse_logged(raw))
        else:
            ostudy.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=t.metric))
    return ostudy


def _optuna_plots() -> Any:
    """`optuna.visualization.matplotlib`, imported without scikit-learn. Its importance plot
    imports `optuna.importance`, whose package imports the fANOVA and MDI evaluators, which import
    scikit-learn when it is installed (MLflow installs it): 1.4-1.7 CPU-seconds at the end of
    every study, for evaluators the report never uses (it uses PED-ANOVA: numpy and scipy)."""
    import sys

    hidden = "sklearn" not in sys.modules
    if hidden:
        sys.modules["sklearn"] = None  # type: ignore[assignment]  # an import of it raises ImportError
    try:
        from optuna.visualization import matplotlib as ovm
    finally:
        if hidden:
            del sys.modules["sklearn"]
    return ovm


def write_plots(outcome, study, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    ovm = _optuna_plots()

    # Optuna marks its matplotlib plots experimental and warns on every call: noise on a
    # study's console, not something its user can act on
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    ostudy = optuna_study(outcome, study)
    paths: list[Path] = []
    ax: Any  # an Axes, or from plot_contour an array of them
    if len(ostudy.trials) >= 2 and len(study.cfg.search_space) >= 1:
        try:
            ax = ovm.plot_param_importances(
                ostudy,
                evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
            )
            path = out_dir / "param_importances.png"
            ax.figure.tight_layout()
            ax.figure.savefig(path, dpi=90)
            plt.close(ax.figure)
            paths.append(path)
        except Exception as exc:  # too few distinct trials for an importance estimate
            say(f"parameter importances skipped: {exc}")
    space = set(study.cfg.search_space)
    for x, y in CONTOUR_PAIRS:
        if {x, y} <= space and len(ostudy.trials) >= 3:
            try:
                ax = ovm.plot_contour(ostudy, params=[x, y])
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                path = out_dir / f"contour_{x.split('.')[1]}.png"
                fig.savefig(path, dpi=90)
                plt.close(fig)
                paths.append(path)
            except Exception as exc:
                say(f"contour {x}/{y} skipped: {exc}")
    return paths


def log_study_report(outcome, study) -> list[str]:
    """Write the table, the plots and the rung fidelity (measured unless the outcome has it),
    log them to the parent run; returns the artifact names."""
    fidelity = _fidelity(outcome, study)  # first: `pisa study run` prints it, whatever fails below
    with tempfile.TemporaryDirectory(prefix="pisa-report-") as tmp:
        out = Path(tmp)
        files = write_table(outcome, out) + write_plots(outcome, study, out)
        summary = format_ranking(outcome, study.cfg.metric)
        if fidelity is not None:
            summary += "\n" + fidelity.text() + "\n"
            files.append(fidelity.write_csv(out / "rung_fidelity.csv"))
            tracking.tracker(outcome.tracking_uri).log_metrics(outcome.parent_run_id, fidelity.metrics(), 0)
        (out / "summary.txt").write_text(summary)
        files.append(out / "summary.txt")
        tracking.tracker(outcome.tracking_uri).log_artifacts(outcome.parent_run_id, files, "report")
        best = outcome.best
        if best is not None and best.metric is not None:
            tracking.tracker(outcome.tracking_uri).log_metrics(
                outcome.parent_run_id, {f"best_{study.cfg.metric}": best.metric}, 0
            )
            tracking.tracker(outcome.tracking_uri).set_tags(outcome.parent_run_id, {tag.BEST_RUN_ID: best.run_id})
        return [f.name for f in files]


def _fidelity(outcome, study) -> Fidelity | None:
    """The outcome's rung fidelity, measured if it has none (`pisa study report`); None
    where the store cannot give it: the rest of the report still gets logged."""
    if outcome.fidelity is None:
        try:
            outcome.fidelity = fidelity_of(outcome, study)
        except Exception as exc:
            say(f"rung fidelity skipped: {exc}")
    return outcome.fidelity


def format_ranking(outcome, metric: str, limit: int | None = None) -> str:
    """The ranked trials as a plain-text table (also what `pisa study best` prints)."""
    from rich.console import Console
    from rich.table import Table

    keys = sorted({k for t in outcome.trials for k in t.params})
    table = Table(title=f"study {outcome.name}: trials ranked by {metric}")
    seeded = any(t.seed_values for t in outcome.trials)
    extra = ["per seed"] if seeded else []
    for col in (
        ["#", "trial", "status", "epochs", metric + (" (seed mean)" if seeded else "")]
        + extra
        + [k.replace("model.", "") for k in keys]
    ):
        table.add_column(col)
    for rank, t in enumerate(outcome.trials[:limit] if limit else outcome.trials, 1):
        per_seed = [" ".join(f"{v:.4f}" for _, v in sorted(t.seed_values.items())) or "-"] if seeded else []
        table.add_row(
            str(rank),
            t.trial_id,
            t.status,
            str(t.epochs),
            "-" if t.metric is None else f"{t.metric:.4f}",
            *per_seed,
            *[_fmt(t.params.get(k), outcome.search_space.get(k)) for k in keys],
        )
    buf = io.StringIO()
    Console(file=buf, width=200, force_terminal=False, color_system=None).print(table)
    return buf.getvalue()


def _fmt(logged: str | None, distribution: Any = None) -> str:
    """A searched value as its distribution reads it back (floats to 4 significant digits),
    else as MLflow logged it."""
    if logged is None:
        return "None"
    value: Any = logged
    if distribution is not None:
        try:
            value = distribution.parse_logged(logged)
        except ValueError:
            pass
    return f"{value:.4g}" if isinstance(value, float) else str(value)
