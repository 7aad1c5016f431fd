"""Variants trained on the same seeds, compared: the table `pisa study validate` and
`pisa compare` print and log.

Per variant the final-epoch metric's mean, standard deviation and t-interval over its
seeds; per variant but a reference, the paired difference to its reference (by default
the first variant) seed by seed, with its interval, wins and a verdict (`pisa.core.stats`).
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import tracking
from ..core.progress import say
from ..core.stats import Paired, Summary, paired, summarize, verdict
from ..tracking.tags import RunStatus
from .training_grid import slug

if TYPE_CHECKING:
    from ..training.train import TrainOutcome

PER_CLASS_PREFIX = "bbox_AP_"  # a training's per-class AP metrics (`pisa.evaluation.per_class_key`)


@dataclass
class Variant:
    """One configuration to train: `params` over a base (validate), or a whole config (compare).
    `reference` is the index of the variant it is compared with (its own index: none)."""

    label: str
    params: dict[str, Any]
    trial_run_id: str | None = None
    reference: int = 0


@dataclass
class VariantResult:
    variant: Variant
    values: dict[int, float] = field(default_factory=dict)  # seed -> final-epoch metric
    failed: dict[int, str] = field(default_factory=dict)  # seed -> error
    run_ids: dict[int, str | None] = field(default_factory=dict)
    per_class: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> class -> AP
    summary: Summary | None = None
    vs_baseline: Paired | None = None  # None for a reference row

    def add(self, seed: int, out: TrainOutcome, metric: str) -> None:
        """One seed's training: its final `metric` (and per-class APs), or why it has none."""
        value = out.metrics.get(metric)
        if out.status == RunStatus.FINISHED and isinstance(value, (int, float)):
            self.values[seed], self.run_ids[seed] = float(value), out.run_id
            self.per_class[seed] = {
                k[len(PER_CLASS_PREFIX) :]: float(v)
                for k, v in out.metrics.items()
                if k.startswith(PER_CLASS_PREFIX) and isinstance(v, (int, float)) and v >= 0
            }
        else:
            self.failed[seed] = out.error or "no metric"

    def class_means(self) -> dict[str, float]:
        """Each class's AP, averaged over the seeds that finished."""
        classes = sorted({c for per in self.per_class.values() for c in per})
        return {
            c: sum(vals) / len(vals)
            for c in classes
            if (vals := [per[c] for per in self.per_class.values() if c in per and math.isfinite(per[c])])
        }


@dataclass
class Validation:
    """A comparison's rows and where it is logged. `study` names what is compared (a study's
    name, or a compare's) in titles."""

    study: str
    metric: str
    mode: str
    seeds: list[int]
    results: list[VariantResult]
    run_id: str | None = None
    tracking_uri: str | None = None
    kind: str = "validation"  # the artifact folder and file names: validation.csv, compare.csv

    @property
    def ok(self) -> bool:
        return all(not r.failed for r in self.results)


def compare(results: list[VariantResult], mode: str, confidence: float = 0.95) -> None:
    """Fill each result's summary and its paired difference to its reference row."""
    for i, r in enumerate(results):
        r.summary = summarize(list(r.values.values()), confidence)
        ref = r.variant.reference
        r.vs_baseline = None if ref == i else paired(r.values, results[ref].values, confidence, mode)


# ---------------------------------------------------------------- output


def _num(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _ci(s: Summary | None, signed: bool = False) -> str:
    if s is None or s.ci_low is None:
        return "-"
    return f"[{_num(s.ci_low, signed)}, {_num(s.ci_high, signed)}]"


@dataclass(frozen=True)
class TableRow:
    """One variant's line of the comparison (`<kind>.csv`, in this order): its summary over
    seeds and its paired difference to its reference (None: nothing to pair)."""

    variant: str
    reference: str  # the reference variant's label
    seeds: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    diff_mean: float | None
    diff_std: float | None
    diff_ci_low: float | None
    diff_ci_high: float | None
    paired_seeds: int | None
    wins: int | None
    losses: int | None
    verdict: str
    failed_seeds: str  # comma separated
    params: str  # the variant's params, JSON

    # logged as `<variant>.<field>` metrics on the comparison's run
    METRICS = ("mean", "std", "ci_low", "ci_high", "diff_mean", "diff_ci_low", "diff_ci_high", "wins")


def table_rows(v: Validation) -> list[TableRow]:
    rows = []
    for r in v.results:
        s, p = r.summary, r.vs_baseline
        rows.append(
            TableRow(
                variant=r.variant.label,
                reference=v.results[r.variant.reference].variant.label,
                seeds=s.n if s else 0,
                mean=s.mean if s else None,
                std=s.std if s else None,
                ci_low=s.ci_low if s else None,
                ci_high=s.ci_high if s else None,
                diff_mean=p.difference.mean if p else None,
                diff_std=p.difference.std if p else None,
                diff_ci_low=p.difference.ci_low if p else None,
                diff_ci_high=p.difference.ci_high if p else None,
                paired_seeds=len(p.seeds) if p else None,
                wins=p.wins if p else None,
                losses=p.losses if p else None,
                verdict=verdict(p, v.mode),
                failed_seeds=",".join(map(str, sorted(r.failed))),
                params=json.dumps(r.variant.params, sort_keys=True, default=str),
            )
        )
    return rows


def format_validation(v: Validation) -> str:
    """The comparison as a plain-text table (what `validate` and `compare` print)."""
    from rich.table import Table

    what = "study " if v.kind == "validation" else ""
    table = Table(title=f"{what}{v.study}: final-epoch {v.metric} over seeds {v.seeds} (95% t-intervals)")
    references = {r.variant.reference for r in v.results}
    # the reference row's own label ("baseline", "paper defaults"), or each row's reference
    against = v.results[0].variant.label.split(" = ")[0] if references == {0} else "its reference"
    for col in ("variant", "n", "mean", "std", "95% CI", f"paired diff vs {against}", "95% CI of diff", "wins"):
        table.add_column(col)
    table.add_column("verdict")
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
    return rendered(
        table,
        200,
        "A variant is better or worse only when the interval of its paired difference excludes 0; "
        "otherwise the gap is within the seed-to-seed noise at this budget.",
    )


def rendered(table: Any, width: int, note: str) -> str:
    """A rich table as plain text `width` wide, with a note under it."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None).print(table)
    return buf.getvalue() + note + "\n"


def format_per_class(v: Validation) -> str:
    """Per-class AP (mean over seeds) of each variant, one column per variant."""
    means = [r.class_means() for r in v.results]
    classes = sorted({c for m in means for c in m})
    if not classes:
        return ""
    width = max(12, *(len(c) for c in classes))
    head = f"{'class AP':<{width}} " + " ".join(f"{r.variant.label[:18]:>18}" for r in v.results)
    lines = [head] + [f"{c:<{width}} " + " ".join(f"{_num(m.get(c)):>18}" for m in means) for c in classes]
    return "\n".join(lines) + "\n"


def _difference_label(v: Validation, index: int) -> str:
    """The second line of a variant's tick: its paired difference to its reference."""
    r = v.results[index]
    p = r.vs_baseline
    if p is None:
        return "reference"
    d = p.difference
    if d.mean is None:
        return "no paired seeds"
    interval = "" if d.ci_low is None or d.ci_high is None else f" [{d.ci_low:+.3f}, {d.ci_high:+.3f}]"
    return f"{d.mean:+.3f}{interval}\n{verdict(p, v.mode)}, {p.wins}/{len(p.seeds)} wins"


def write_plot(v: Validation, path: Path) -> Path:
    """`per_seed.png`: a box per variant (median, quartiles, the mean dashed), each seed a
    point in its colour, and a line joining each seed's points across the variants: the seeds
    are paired, and lines that all slope one way are the consistent effect the verdict rests
    on. Under each variant but the reference: its paired difference, interval and verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.variant.label}\n{_difference_label(v, i)}" for i, r in enumerate(v.results)]
    data = [[r.values[s] for s in sorted(r.values)] for r in v.results]
    fig, ax = plt.subplots(figsize=(max(4.5, 2.2 * len(labels)), 4.2))
    ax.boxplot(
        [d if d else [float("nan")] for d in data],
        widths=0.45,
        showfliers=False,  # every seed is drawn as a point already
        showmeans=True,
        meanline=True,
        meanprops={"color": "black", "linestyle": "--", "linewidth": 1},
        medianprops={"color": "grey"},
    )
    cmap = plt.get_cmap("tab10")
    for j, seed in enumerate(v.seeds):
        colour = cmap(j % 10)
        xs = [i for i, r in enumerate(v.results, 1) if seed in r.values]
        ys = [r.values[seed] for r in v.results if seed in r.values]
        ax.plot(xs, ys, color=colour, alpha=0.45, linewidth=1, zorder=2)
        ax.scatter(xs, ys, color=colour, s=24, zorder=3, label=f"seed {seed}")
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.set_ylabel(f"final-epoch {v.metric}")
    ax.set_title(f"{v.study}: {v.metric} per seed (dashed: mean)", fontsize=10)
    if v.seeds:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_files(v: Validation, out: Path) -> list[Path]:
    """The table (text, CSV), per-seed values (JSON) and the plot, written into `out`."""
    rows = table_rows(v)
    text = format_validation(v) + ("\n" + format_per_class(v) if v.kind != "validation" else "")
    files = [out / f"{v.kind}.txt", out / f"{v.kind}.csv", out / "per_seed.json"]
    files[0].write_text(text)
    with files[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c.name for c in fields(TableRow)])
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    per_seed = [
        {
            "variant": r.variant.label,
            "seed": s,
            v.metric: r.values.get(s),
            "per_class_AP": r.per_class.get(s),
            "run_id": r.run_ids.get(s),
            "error": r.failed.get(s),
        }
        for s in v.seeds
        for r in v.results
    ]
    files[2].write_text(json.dumps(per_seed, indent=2))
    try:
        files.append(write_plot(v, out / "per_seed.png"))
    except Exception as exc:  # a plot must never cost the results
        say(f"{v.kind} plot skipped: {exc}")
    return files


def log_validation(v: Validation) -> None:
    """The table's numbers as metrics, its files as artifacts, on the comparison's run."""
    if not v.run_id or not v.tracking_uri:
        return
    metrics: dict[str, float] = {}
    for r, row in zip(v.results, table_rows(v)):
        name = slug(r.variant.label.split(" = ")[0])
        for key in TableRow.METRICS:
            value = getattr(row, key)
            if value is not None:
                metrics[f"{name}.{key}"] = value
    tracking.tracker(v.tracking_uri).log_metrics(v.run_id, metrics, step=0)
    with tempfile.TemporaryDirectory(prefix=f"pisa-{v.kind}-") as tmp:
        files = write_files(v, Path(tmp))
        tracking.tracker(v.tracking_uri).log_artifacts(v.run_id, files, v.kind)
