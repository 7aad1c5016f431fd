"""Measured training rates of the shipped detector configs on named GPU types, with where each
came from: `benchmarks/data/rates.csv`, one row per measurement (never an estimate).

`pisa study plan --gpu-type h200` prices a study from it when there is no probe and no earlier
run of the same model. Each row carries the commit, command and date that measured it and the
hash of the training step's sources (`STEP_FILES`) at that commit: a row whose hash differs
from the installed code's is stale, and is still used, with that said. `benchmarks/gpu_check.py`
appends rows when it runs on a GPU (`append_rows`).

Columns (`COLUMNS`): `config` (the configs/ file the model came from), `detector` and `backbone`
(`model.*`, what a study is matched on), `gpu` (the type's short name, `--gpu-type`), `device`
(the card's name), `precision` (`fp16+gradscaler`, `bf16`, `fp32`), `gpus` and
`images_per_gpu` (the layout measured), `input` (the images' size and kind), `train_img_per_s`
(per GPU), `eval_s_per_image` (empty: not measured), `gpu_mem_peak_gib`,
`gpu_mem_per_image_gib` (peak / images: an upper bound, the fixed part included), `measured`
(what the number includes and leaves out), `torch`, `commit`, `date`, `command`, `step_hash`.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from ..core.errors import ConfigError
from .training_rate import Rate
from .workload import Workload

# the repository's table (a source checkout; an installed package without it has no rows)
RATES_CSV = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "rates.csv"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding `pisa/`

# The sources a training step runs (the engine's loop, device plan and batch copy, the
# detectors, the PISA maths and the samplers): a change in any of them may change the rate.
# Patterns relative to the directory holding `pisa/`.
STEP_FILES = (
    "pisa/training/engine.py",
    "pisa/training/device_plan.py",
    "pisa/training/loaders.py",
    "pisa/models/*.py",
    "pisa/core/pisa_math.py",
    "pisa/core/sampling.py",
)


@dataclass(frozen=True)
class RateRow:
    """One measured row of the table (all text as the CSV holds it, numbers parsed)."""

    config: str
    detector: str
    backbone: str
    gpu: str
    device: str
    precision: str
    gpus: int
    images_per_gpu: int
    input: str
    train_img_per_s: float
    eval_s_per_image: float | None
    gpu_mem_peak_gib: float | None
    gpu_mem_per_image_gib: float | None
    measured: str
    torch: str
    commit: str
    date: str
    command: str
    step_hash: str


COLUMNS = tuple(f.name for f in fields(RateRow))


# ---------------------------------------------------------------- the step's hash


def step_hash_of(contents: Mapping[str, bytes]) -> str:
    """12 hex digits over the files' paths and contents (sorted by path)."""
    digest = hashlib.sha256()
    for path in sorted(contents):
        digest.update(path.encode() + b"\0" + hashlib.sha256(contents[path]).hexdigest().encode() + b"\n")
    return digest.hexdigest()[:12]


def step_files(root: Path = PACKAGE_ROOT, patterns: Iterable[str] = STEP_FILES) -> dict[str, bytes]:
    """The training step's sources under `root`, by their path relative to it."""
    found: dict[str, bytes] = {}
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            found[path.relative_to(root).as_posix()] = path.read_bytes()
    return found


def step_hash(root: Path = PACKAGE_ROOT) -> str:
    """The installed training step's hash (`STEP_FILES` under `root`)."""
    return step_hash_of(step_files(root))


# ---------------------------------------------------------------- the table


def read_rows(path: Path | None = None) -> list[RateRow]:
    """The table's rows (default: `RATES_CSV`), in file order (the latest measurement last);
    none when it is absent."""
    path = path or RATES_CSV
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path}: missing column(s) {', '.join(missing)}")
        return [_parse(row, path, i + 2) for i, row in enumerate(reader)]


def _parse(row: dict[str, str], path: Path, line: int) -> RateRow:
    def number(key: str, required: bool = False) -> float | None:
        text = (row.get(key) or "").strip()
        if not text:
            if required:
                raise ConfigError(f"{path}:{line}: {key} is empty")
            return None
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{path}:{line}: {key}: {text!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{path}:{line}: {key}: {text!r} is not a positive number")
        return value

    values: dict[str, object] = {c: (row.get(c) or "").strip() for c in COLUMNS}
    values["gpus"] = int(number("gpus", True) or 0)
    values["images_per_gpu"] = int(number("images_per_gpu", True) or 0)
    values["train_img_per_s"] = number("train_img_per_s", True)
    for key in ("eval_s_per_image", "gpu_mem_peak_gib", "gpu_mem_per_image_gib"):
        values[key] = number(key)
    return RateRow(**values)  # type: ignore[arg-type]


def append_rows(rows: Iterable[RateRow], path: Path | None = None) -> int:
    """Append measured rows to the table (default: `RATES_CSV`; its header first when the file
    is new); how many."""
    path = path or RATES_CSV
    rows = list(rows)
    new = not path.is_file() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(getattr(row, c)) for c in COLUMNS})
    return len(rows)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def gpu_types(rows: Iterable[RateRow]) -> list[str]:
    return sorted({r.gpu for r in rows})


def check_gpu_type(gpu_type: str, rows: list[RateRow], path: Path | None = None) -> str:
    """`--gpu-type` as the table names it (case-insensitive); a `ConfigError` listing the known ones."""
    known = gpu_types(rows)
    wanted = gpu_type.strip().lower()
    if wanted not in known:
        listed = ", ".join(known) if known else f"none ({_shown(path or RATES_CSV)} has no rows)"
        raise ConfigError(f"--gpu-type {gpu_type}: no reference rates for it; known GPU types: {listed}")
    return wanted


# ---------------------------------------------------------------- a study's rate


def study_precision(work: Workload) -> str:
    """The precision the study's trials train in on a GPU from Ampere on (the table's types):
    `train.amp` and `train.amp_dtype` as the engine's device plan resolves them there."""
    train = work.experiment.train
    if train.amp is False:
        return "fp32"
    return "fp16+gradscaler" if train.amp_dtype == "float16" else "bf16"


def rate_from_table(
    work: Workload,
    gpu_type: str,
    rows: list[RateRow],
    installed_hash: str | Callable[[], str] = step_hash,
    path: Path | None = None,
) -> tuple[Rate | None, str, list[str]]:
    """The latest row of the study's detector and backbone on `gpu_type`, scaled to the trial's
    workers (one per GPU, linear: the row has no all-reduce): (rate, "", notes), or
    (None, why, []) when the table has no such row."""
    path = path or RATES_CSV
    model = work.experiment.model
    same = [r for r in rows if r.gpu == gpu_type and r.detector == model.detector and r.backbone == model.backbone]
    if not same:
        measured = sorted({f"{r.detector} {r.backbone}" for r in rows if r.gpu == gpu_type})
        return (
            None,
            f"{_shown(path)} has no {model.detector} {model.backbone} row for {gpu_type} "
            f"(it has {', '.join(measured)})",
            [],
        )
    row = same[-1]
    workers = work.experiment.train.workers
    scaled = f" x {workers} workers" if workers > 1 else ""
    source = (
        f"{_shown(path)}: {row.device}, {row.config}, {row.train_img_per_s:.3g} img/s per GPU{scaled} "
        f"(commit {row.commit}, {row.date})"
    )
    notes = [
        f"reference rate: {row.measured}; measured with `{row.command}` on {row.gpus} GPU x "
        f"{row.images_per_gpu} images, {row.precision}, torch {row.torch}"
        + (f" (the latest of {len(same)} rows)" if len(same) > 1 else "")
    ]
    if row.eval_s_per_image is None:
        notes.append("the reference rate has no evaluation time: the epochs are priced without evaluation")
    installed = installed_hash() if callable(installed_hash) else installed_hash
    if row.step_hash != installed:
        notes.append(
            f"stale reference rate: the training step's sources hash to {installed} here, "
            f"{row.step_hash} at commit {row.commit} that measured it (the step changed since); used as it is"
        )
    precision = study_precision(work)
    if precision != row.precision:
        notes.append(
            f"the reference rate was measured in {row.precision}, this study trains in {precision} "
            "(train.amp, train.amp_dtype): its rate will differ"
        )
    if row.images_per_gpu != work.experiment.train.images_per_worker:
        notes.append(
            f"the reference rate was measured at {row.images_per_gpu} images per GPU, "
            f"the trials train {work.experiment.train.images_per_worker}"
        )
    eval_s = None
    if row.eval_s_per_image is not None:
        from .dataset_size import val_set_size

        val = val_set_size(work.experiment.data)
        if val is None:
            notes.append("the validation set's size is unknown: evaluation is not priced")
        else:  # evaluation is sharded over the workers
            eval_s = math.ceil(val.images / workers) * row.eval_s_per_image
    return Rate(row.train_img_per_s * workers, source, eval_s=eval_s, device="cuda"), "", notes


def _shown(path: Path) -> str:
    try:
        return path.relative_to(PACKAGE_ROOT).as_posix()
    except ValueError:
        return str(path)
