"""`pisa paper`: the paper's table (baseline vs PISA per detector) trained here.

The pairs come from the configs' `reference` fields: a PISA config names its row and its
baseline config; both carry the published metrics. Every pair trains on the same seeds in
one `pisa compare` (each PISA config compared with its own baseline), and the table sets
what was trained beside the reference, with the budget actually trained, so that a
shortened run is never read as the paper's.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .. import tracking
from ..core.config import load_config
from ..core.errors import ConfigError
from ..core.stats import verdict
from .compare import Entry
from .table import Validation, rendered


@dataclass
class PaperPair:
    """One row of the table: a detector's baseline and PISA configs (indices into the entries)."""

    row: str
    baseline: int
    pisa: int


def paper_entries(
    configs_dir: str | Path, detectors: list[str] | None, overrides: list[str] | None = None
) -> tuple[list[Entry], list[PaperPair]]:
    """The baseline and PISA config of each asked-for row (all rows for None), in the
    directory's order of rows; each PISA entry is compared with its own baseline."""
    folder = Path(configs_dir)
    if not folder.is_dir():
        raise ConfigError(f"--configs {folder}: no such directory")
    found: dict[str, tuple[Path, Path]] = {}
    for path in sorted(folder.glob("*.yaml")):
        ref = load_config(path).reference
        if ref is not None and ref.baseline:
            baseline = folder / ref.baseline
            if not baseline.is_file():
                raise ConfigError(f"{path}: reference.baseline: {ref.baseline} is not in {folder}")
            found[ref.row] = (baseline, path)
    if not found:
        raise ConfigError(f"--configs {folder}: no config there names a reference row with a baseline")
    wanted = list(found) if not detectors or detectors == ["all"] else detectors
    unknown = [d for d in wanted if d not in found]
    if unknown:
        raise ConfigError(f"--detectors: unknown {', '.join(unknown)}; the rows in {folder}: {', '.join(found)}")
    entries: list[Entry] = []
    pairs: list[PaperPair] = []
    for row in wanted:
        base_path, pisa_path = found[row]
        b = len(entries)
        entries.append(Entry(base_path.stem, load_config(base_path, overrides), b, str(base_path)))
        entries.append(Entry(pisa_path.stem, load_config(pisa_path, overrides), b, str(pisa_path)))
        pairs.append(PaperPair(row, b, b + 1))
    return entries, pairs


def _ap(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


@dataclass(frozen=True)
class PaperRow:
    """One detector's line of the table (`paper.csv`, in this order): metrics as fractions of 1,
    None where nothing was measured or published."""

    detector: str
    baseline: float | None  # trained: the mean over seeds
    pisa: float | None
    diff: float | None  # the paired difference PISA - baseline
    diff_ci_low: float | None
    diff_ci_high: float | None
    seeds: int  # paired seeds
    verdict: str
    reference_baseline: float | None
    reference_pisa: float | None
    reference_pisa_published: bool  # false: the reference has no result for PISA
    reference_diff: float | None
    epochs: int
    images: int | None  # trained: epochs x training images
    reference_budget: str
    failed: str  # `seed S: error; ...`


def paper_rows(result: Validation, entries: list[Entry], pairs: list[PaperPair]) -> list[PaperRow]:
    """The table's rows: trained (mean, interval of the paired difference, verdict), the
    reference's baseline and PISA metric and difference, the budget trained and the reference's."""
    rows = []
    metric = result.metric
    for pair in pairs:
        base, pisa = result.results[pair.baseline], result.results[pair.pisa]
        ref_base = entries[pair.baseline].config.reference
        ref_pisa = entries[pair.pisa].config.reference
        rb = ref_base.metrics.get(metric) if ref_base else None
        rp = ref_pisa.metrics.get(metric) if ref_pisa else None
        cfg = entries[pair.pisa].config
        epochs = cfg.train.resolved().epochs
        images = entries[pair.pisa].train_images
        d = pisa.vs_baseline.difference if pisa.vs_baseline else None
        failed = {**{s: e for s, e in base.failed.items()}, **{s: e for s, e in pisa.failed.items()}}
        rows.append(
            PaperRow(
                detector=pair.row,
                baseline=base.summary.mean if base.summary and base.summary.n else None,
                pisa=pisa.summary.mean if pisa.summary and pisa.summary.n else None,
                diff=d.mean if d and d.n else None,
                diff_ci_low=d.ci_low if d else None,
                diff_ci_high=d.ci_high if d else None,
                seeds=len(pisa.vs_baseline.seeds) if pisa.vs_baseline else 0,
                verdict=verdict(pisa.vs_baseline, result.mode) if d and d.n else "failed",
                reference_baseline=rb,
                reference_pisa=rp,
                reference_pisa_published=ref_pisa.published if ref_pisa else True,
                reference_diff=rp - rb if rb is not None and rp is not None else None,
                epochs=epochs,
                images=epochs * images if images is not None else None,
                reference_budget=ref_pisa.budget if ref_pisa else "",
                failed="; ".join(f"seed {s}: {e}" for s, e in sorted(failed.items())),
            )
        )
    return rows


def format_paper(result: Validation, rows: list[PaperRow]) -> str:
    """The table `pisa paper` prints: AP points as in the paper (+1.0 AP = +0.010 of the metric)."""
    from rich.table import Table

    table = Table(title=f"{result.study}: final-epoch {result.metric} in AP points, seeds {result.seeds}")
    for col in (
        "detector",
        "baseline",
        "PISA",
        "PISA - baseline [95% CI]",
        "verdict",
        "reference baseline -> PISA",
        "trained",
        "reference trained",
    ):
        table.add_column(col)
    for r in rows:
        diff = "-"
        if r.diff is not None:
            diff = f"{100 * r.diff:+.2f}"
            if r.diff_ci_low is not None and r.diff_ci_high is not None:
                diff += f" [{100 * r.diff_ci_low:+.2f}, {100 * r.diff_ci_high:+.2f}]"
        pisa = _ap(r.reference_pisa) if r.reference_pisa_published else "not published"
        ref = f"{_ap(r.reference_baseline)} -> {pisa}"
        if r.reference_diff is not None:
            ref += f" ({100 * r.reference_diff:+.1f})"
        trained = f"{r.epochs} epochs" + (f", {r.images:,} images" if r.images is not None else "")
        table.add_row(
            r.detector,
            _ap(r.baseline),
            _ap(r.pisa),
            diff,
            r.verdict + (f" ({r.failed})" if r.failed else ""),
            ref,
            trained,
            r.reference_budget,
        )
    return rendered(
        table,
        220,
        "Trained and reference numbers are comparable only at the reference's budget; "
        "a difference is significant only when its interval excludes 0.",
    )


def log_paper(result: Validation, rows: list[PaperRow]) -> None:
    """The table as `paper.txt` and `paper.csv` on the compare's MLflow run."""
    if not result.run_id or not result.tracking_uri:
        return
    with tempfile.TemporaryDirectory(prefix="pisa-paper-") as tmp:
        out = Path(tmp)
        (out / "paper.txt").write_text(format_paper(result, rows))
        with (out / "paper.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[c.name for c in fields(PaperRow)])
            writer.writeheader()
            writer.writerows(asdict(row) for row in rows)
        tracking.tracker(result.tracking_uri).log_artifacts(
            result.run_id, [out / "paper.txt", out / "paper.csv"], "paper"
        )
