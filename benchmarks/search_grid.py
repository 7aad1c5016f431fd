"""A tabular benchmark from real trainings: the quickstart detector on a grid of PISA points.

Every point of a 5 x 5 grid over ISR-P's k and CARL's k (the other two quickstart parameters
at the paper's values, k and bias of the paper's defaults among the levels), plus the random
baseline, trained from scratch on the quickstart's generated shapes over several seeds, with
the quickstart's decaying schedule (4 epochs, LR x0.1 after epoch 3) and, as a cheaper
fidelity that still decays, a shortened one (2 epochs, LR x0.1 after epoch 1). Every epoch's
val bbox_mAP and its train and eval seconds go to one CSV row each, appended as each training
ends, so a killed run continues where it stopped:

    python benchmarks/search_grid.py --seeds 5 --schedule full       # 130 trainings
    python benchmarks/search_grid.py --seeds 5 --schedule short      # 125 more, half as long

Each training runs the engine's own loop (`pisa.training.engine.run_worker`) in a spawned
process with one thread (as a quickstart trial does), `--jobs` at once. `bench_search.py`
replays search strategies against the CSV.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GRID_CSV = REPO / "benchmarks" / "data" / "search_grid.csv"
TRIAL_CONFIG = REPO / "configs" / "quickstart_trial.yaml"
ISR_P_K = (0.5, 1.0, 1.5, 2.0, 3.0)
CARL_K = (0.5, 0.75, 1.0, 1.5, 2.0)
PAPER = {"isr_p_k": 2.0, "carl_k": 1.0}
SCHEDULES = {"full": {"epochs": 4, "milestones": [3]}, "short": {"epochs": 2, "milestones": [1]}}
FIELDS = [
    "schedule",
    "point",
    "isr_p_k",
    "carl_k",
    "seed",
    "epoch",
    "epochs",
    "bbox_mAP",
    "train_loss",
    "time_train_s",
    "time_eval_s",
    "wall_s",
]


def points() -> list[dict[str, Any]]:
    """The grid's points: the baseline first, then ISR-P k x CARL k (the rest at the paper's)."""
    grid: list[dict[str, Any]] = [{"point": "baseline", "isr_p_k": "", "carl_k": ""}]
    for ik, ck in itertools.product(ISR_P_K, CARL_K):
        grid.append({"point": f"isr{ik:g}_carl{ck:g}", "isr_p_k": ik, "carl_k": ck})
    return grid


def experiment(point: dict[str, Any], seed: int, schedule: str, work: Path) -> dict[str, Any]:
    cfg = yaml.safe_load(TRIAL_CONFIG.read_text())
    cfg["data"]["synthetic"]["out"] = str(work / "quickstart")
    cfg["train"].update(SCHEDULES[schedule], seed=seed)
    cfg["tracking"] = {"uri": f"sqlite:///{work / 'unused.db'}", "experiment": "grid"}
    cfg["storage_path"] = str(work / "ray_results")
    model = cfg["model"]
    if point["point"] == "baseline":
        model.update(sampler="random", isr_p={"enabled": False}, carl={"enabled": False})
    else:
        model["isr_p"]["k"] = point["isr_p_k"]
        model["carl"]["k"] = point["carl_k"]
    return cfg


class _Recorder:
    """A one-process `TrainSession` that keeps each epoch's report."""

    rank, world_size = 0, 1

    def __init__(self) -> None:
        self.reports: list[dict[str, float]] = []
        self.t0 = time.perf_counter()

    def device(self):
        import torch

        return torch.device("cpu")

    def prepare_model(self, model, find_unused_parameters: bool, broadcast_buffers: bool = True):
        return model

    def report(self, metrics, checkpoint_dir) -> None:
        self.reports.append({**metrics, "wall_s": time.perf_counter() - self.t0})

    def restored_checkpoint(self):
        return contextlib.nullcontext(None)

    def stop_on(self, error) -> None:
        raise error


def _train(job: tuple[dict[str, Any], int, str, str]) -> list[dict[str, Any]]:
    point, seed, schedule, work = job
    import torch

    torch.set_num_threads(1)
    from pisa.core.config import parse_config
    from pisa.training.engine import run_worker

    cfg = parse_config(experiment(point, seed, schedule, Path(work)))
    session = _Recorder()
    error = run_worker({"experiment": cfg.model_dump(mode="json")}, session)
    rows = []
    for r in session.reports:
        rows.append(
            {
                **point,
                "schedule": schedule,
                "seed": seed,
                "epoch": int(r["epoch"]),
                "epochs": SCHEDULES[schedule]["epochs"],
                "bbox_mAP": float("nan") if error else r.get("bbox_mAP", float("nan")),
                "train_loss": r.get("train_loss", float("nan")),
                "time_train_s": round(r["time_train_s"], 3),
                "time_eval_s": round(r["time_eval_s"], 3),
                "wall_s": round(r["wall_s"], 3),
            }
        )
    return rows


def done_keys(path: Path) -> set[tuple[str, str, int]]:
    if not path.exists():
        return set()
    with path.open() as f:
        rows = list(csv.DictReader(f))
    finished = {(r["schedule"], r["point"], int(r["seed"])) for r in rows if int(r["epoch"]) == int(r["epochs"])}
    return finished


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="full")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=GRID_CSV)
    parser.add_argument("--work", type=Path, default=REPO / "data" / "search_grid")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    from pisa.core.config import SyntheticConfig
    from pisa.data import ensure_synthetic

    base = yaml.safe_load(TRIAL_CONFIG.read_text())["data"]["synthetic"]
    ensure_synthetic(SyntheticConfig(**{**base, "out": args.work / "quickstart"}))  # once, before the processes

    finished = done_keys(args.out)
    grid = [p for p in points() if not (args.no_baseline and p["point"] == "baseline")]
    # seed-major: a partial grid has every point at the first seeds
    jobs = [
        (p, seed, args.schedule, str(args.work))
        for seed in range(args.seeds)
        for p in grid
        if (args.schedule, p["point"], seed) not in finished
    ]
    total = len(jobs)
    print(f"{total} training(s) to run ({len(finished)} finished before), {args.jobs} at a time", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.out.exists()
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=8) as pool, args.out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for i, rows in enumerate(pool.imap_unordered(_train, jobs), 1):
            # only complete trainings are written: a partial one would look finished to a resume
            writer.writerows(rows)
            f.flush()
            last = rows[-1]
            print(
                f"[{i}/{total}] {last['schedule']} {last['point']} seed {last['seed']}: "
                f"bbox_mAP {last['bbox_mAP']:.4f} ({last['wall_s']:.0f} s; {time.perf_counter() - t0:.0f} s in all)",
                flush=True,
            )


if __name__ == "__main__":
    main()
