"""Where a study's wall time goes, and what ASHA saves against FIFO.

A study's wall time is split into training (the per-epoch `time_train_s + time_eval_s`
every trial reported, read back from the study's MLflow metric histories) and
overhead (Ray / Tune / Train start-up, MLflow logging, scheduling, idle trial slots):

    overhead fraction = 1 - sum over trials of (train + eval seconds)
                            / (wall seconds x max_concurrent_trials)

`wall` is the `run_study` call (data check, Ray start, MLflow parent run, the Tune fit,
the study report), measured in a fresh process per study. The goal is <= 15%. The
overhead is further split into time inside the trials (a trial's MLflow run, from its
start to its end, minus its training) and time outside them (driver start-up, empty
trial slots, the report), and each trial's fixed start-up is given as the time from
its MLflow run's start to its first reported epoch, minus that epoch's train + eval.

`--compare-schedulers` runs the same search (same seed, same number of trials) with
ASHA and with FIFO and prints the trial-epochs each spent (epochs reported, summed
over trials), the best metric each reached, and their ratios.

Each study runs in its own temporary working directory, with its own SQLite MLflow
store and Ray results folder, under a unique name.

    python benchmarks/bench_study.py                                # studies/quickstart.yaml, else a built-in study
    python benchmarks/bench_study.py --study studies/bccd_cpu.yaml --set num_samples=4
    python benchmarks/bench_study.py --compare-schedulers --num-samples 6

Without `studies/quickstart.yaml` (or with `--builtin`) the study is a small one on
a generated shapes set: Faster R-CNN MobileNetV3-FPN at 96 px, ISR-P + CARL, 4 epochs
of 16 images, k and b of ISR-P and b of CARL searched, 2 trials at a time of 1 CPU
worker each, ASHA (grace 1 epoch, reduction factor 2), paper defaults first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from pisa.core.small_configs import SMALL_FASTER_RCNN

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "studies" / "quickstart.yaml"
GOAL = 0.15


# ---------------------------------------------------------------- the built-in study


def write_builtin_study(root: Path, epochs: int = 4) -> Path:
    """A small study on a generated shapes set (generated here, once)."""
    from pisa.data import generate_synthetic

    data = root / "synthetic"
    if not (data / "val.json").exists():
        generate_synthetic(data, n_train=16, n_val=8, seed=0, image_size=96)
    base = {
        "name": "bench-small",
        "model": {**SMALL_FASTER_RCNN, "isr_p": {"enabled": True}, "carl": {"enabled": True}},
        "data": {
            "train_images": str(data / "train"),
            "train_annotations": str(data / "train.json"),
            "val_images": str(data / "val"),
            "val_annotations": str(data / "val.json"),
        },
        "train": {
            "schedule": "custom",
            "epochs": epochs,
            "lr": 0.02,
            "base_batch": 16,
            "milestones": [epochs - 1],
            "warmup_iters": 4,
            "workers": 1,
            "use_gpu": False,
            "images_per_worker": 2,
            "log_every": 4,
            "seed": 0,
        },
        "tracking": {"experiment": "bench-study"},
    }
    (root / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    study = {
        "name": "bench-small",
        "base": "base.yaml",
        "search_space": {
            "model.isr_p.k": {"type": "uniform", "low": 0.5, "high": 3.0},
            "model.isr_p.bias": {"type": "uniform", "low": 0.0, "high": 0.5},
            "model.carl.bias": {"type": "uniform", "low": 0.0, "high": 0.5},
        },
        "metric": "bbox_mAP",
        "mode": "max",
        "num_samples": 4,
        "max_concurrent_trials": 2,
        "resources_per_trial": {"workers": 1, "gpus_per_worker": 0},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "points_to_evaluate": "paper",
        "seed": 0,
    }
    path = root / "bench_small.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


# ---------------------------------------------------------------- one study, in its own process


def child(spec_file: str) -> int:
    """Load and run one study (in a fresh process); write its bookkeeping as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    from pisa.search.study import load_study
    from pisa.search.tuner import run_study

    # relative paths in the study mean what they mean for `pisa study run` from `load_cwd`
    os.chdir(spec["load_cwd"])
    study = load_study(spec["study"], spec["overrides"])
    os.chdir(spec["workdir"])
    t0 = time.time()
    outcome = run_study(study)
    t1 = time.time()
    Path(spec["result"]).write_text(
        json.dumps(
            {
                "t0": t0,
                "t1": t1,
                "name": study.name,
                "uri": outcome.tracking_uri,
                "experiment": study.base["tracking"]["experiment"],
                "parent_run_id": outcome.parent_run_id,
                "metric": study.cfg.metric,
                "mode": study.cfg.mode,
                "num_samples": study.cfg.num_samples,
                "concurrency": study.cfg.max_concurrent_trials,
                "scheduler": study.cfg.scheduler.type,
                "max_epochs": study.base_config.train.resolved().epochs,
                "interrupted": outcome.interrupted,
            }
        )
    )
    return 0


def run_one(label: str, study_path: Path, overrides: list[str], keep: bool, load_cwd: Path) -> dict:
    """Run one study in a fresh process, in a fresh working dir; return its measurements."""
    workdir = Path(tempfile.mkdtemp(prefix=f"pisa-bench-study-{label}-"))
    base_name = yaml.safe_load(study_path.read_text()).get("name", "study")
    name = f"{base_name}-{label}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    spec: dict[str, Any] = {
        "study": str(study_path),
        "load_cwd": str(load_cwd),
        "workdir": str(workdir),
        "result": str(workdir / "bench_result.json"),
        "overrides": list(overrides)
        + [
            f"name={name}",
            f"storage_path={workdir / 'ray_results'}",
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        ],
    }
    (workdir / "bench_spec.json").write_text(json.dumps(spec))
    print(f"\n=== study {name} ({label}) in {workdir}", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(workdir / "bench_spec.json")],
        cwd=workdir,
        env=env,
    )
    process_wall = time.time() - start
    if proc.returncode != 0 or not Path(spec["result"]).exists():
        raise SystemExit(f"study {name} failed (exit {proc.returncode}); its files are in {workdir}")
    info = json.loads(Path(spec["result"]).read_text())
    info["process_wall"] = process_wall
    info["workdir"] = str(workdir)
    info["label"] = label
    info.update(measure(info))
    if not keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return info


# ---------------------------------------------------------------- reading the study back from MLflow


def measure(info: dict) -> dict:
    from pisa import tracking
    from pisa.search import fidelity
    from pisa.search.results import collect

    uri = info["uri"]
    tracker = tracking.tracker(uri)
    outcome = collect(info["name"], uri, info["experiment"], info["parent_run_id"], info["metric"], info["mode"])
    trials = []
    for t in outcome.trials:
        run = tracker.run(t.run_id)
        hist = {
            key: sorted(tracker.metric_history(t.run_id, key), key=lambda m: (m.step, m.timestamp))
            for key in ("time_train_s", "time_eval_s", "epoch")
        }
        train = sum(m.value for m in hist["time_train_s"])
        evals = sum(m.value for m in hist["time_eval_s"])
        start, end = run.info.start_time / 1000, (run.info.end_time or 0) / 1000 or None
        first = min((m.timestamp for m in hist["epoch"]), default=None)
        last = max((m.timestamp for m in hist["epoch"]), default=None)
        startup = None
        if first is not None and hist["time_train_s"] and hist["time_eval_s"]:
            startup = first / 1000 - start - hist["time_train_s"][0].value - hist["time_eval_s"][0].value
        trials.append(
            {
                "trial_id": t.trial_id,
                "status": t.status,
                "metric": t.metric,
                "params": t.params,
                "epochs": len(hist["epoch"]),
                "train_s": train,
                "eval_s": evals,
                "start": start,
                "end": end,
                "span_s": (end - start) if end else None,
                "startup_s": startup,
                "tail_s": (end - last / 1000) if (end and last) else None,
            }
        )
    wall = info["t1"] - info["t0"]
    conc = info["concurrency"]
    work = sum(t["train_s"] + t["eval_s"] for t in trials)
    spans = sum(t["span_s"] or 0.0 for t in trials)
    parent = tracker.run(info["parent_run_id"])
    first_trial = min((t["start"] for t in trials), default=None)
    # every epoch before the last, whatever the scheduler: a FIFO study is the unbiased pilot
    histories = fidelity.metric_histories(uri, [t.run_id for t in outcome.trials], info["metric"])
    last_epoch = info["max_epochs"]
    rungs = fidelity.correlations(histories, range(1, last_epoch), last_epoch)
    best = outcome.best
    return {
        "wall": wall,
        "work": work,
        "spans": spans,
        "trials": trials,
        "overhead": 1 - work / (wall * conc),
        "in_trial_overhead": (spans - work) / (wall * conc),
        "outside_trial_overhead": 1 - spans / (wall * conc),
        "driver_startup_s": parent.info.start_time / 1000 - info["t0"],
        "to_first_trial_s": (first_trial - info["t0"]) if first_trial else None,
        "trial_epochs": sum(t["epochs"] for t in trials),
        "rank_correlation": [{"epoch": r.epoch, "spearman": r.spearman, "trials": r.trials} for r in rungs],
        "best": best.metric if best else None,
        "best_trial": best.trial_id if best else None,
    }


# ---------------------------------------------------------------- printing


def _f(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def print_study(r: dict) -> None:
    conc = r["concurrency"]
    print(
        f"\n--- {r['name']}: {r['num_samples']} trials, {conc} at a time, {r['scheduler']} scheduler, "
        f"{r['max_epochs']} epochs max"
    )
    print(
        f"  {'trial':<14}{'status':<15}{'epochs':>7}{'train s':>9}{'eval s':>8}{'span s':>8}"
        f"{'start-up s':>11}{'tail s':>8}  {r['metric']}"
    )
    for t in sorted(r["trials"], key=lambda t: t["start"]):
        print(
            f"  {t['trial_id']:<14}{t['status']:<15}{t['epochs']:>7}{t['train_s']:>9.1f}{t['eval_s']:>8.1f}"
            f"{_f(t['span_s']):>8}{_f(t['startup_s']):>11}{_f(t['tail_s']):>8}  {_f(t['metric'], '{:.4f}')}"
        )
    wall, work = r["wall"], r["work"]
    print(
        f"  wall (run_study) {wall:.1f} s (process {r['process_wall']:.1f} s); "
        f"trial slots {wall * conc:.1f} s = wall x {conc}"
    )
    print(
        f"  training (train + eval, summed over trials) {work:.1f} s = {100 * work / (wall * conc):.1f}% of the slots"
    )
    print(
        f"  overhead {100 * r['overhead']:.1f}% (goal <= {100 * GOAL:.0f}%: "
        f"{'met' if r['overhead'] <= GOAL else 'NOT met'})"
    )
    print(f"    inside trials  (run span - train - eval) {100 * r['in_trial_overhead']:.1f}%")
    print(f"    outside trials (driver start-up, empty slots, report) {100 * r['outside_trial_overhead']:.1f}%")
    startups = [t["startup_s"] for t in r["trials"] if t["startup_s"] is not None]
    if startups:
        med = statistics.median(startups)
        print(
            f"  per-trial fixed start-up (first epoch reported - trial start - epoch-1 train/eval): "
            f"median {med:.1f} s, min {min(startups):.1f} s, max {max(startups):.1f} s"
        )
        per_epoch = [(t["train_s"] + t["eval_s"]) / t["epochs"] for t in r["trials"] if t["epochs"]]
        if per_epoch:
            need = med * (1 - GOAL) / GOAL
            print(
                f"  median trial epoch {statistics.median(per_epoch):.1f} s: the start-up alone stays under "
                f"{100 * GOAL:.0f}% only for trials of >= {need:.0f} s of training "
                f"(~{need / statistics.median(per_epoch):.0f} epochs of this size)"
            )
    print(
        f"  driver start-up to the parent MLflow run {r['driver_startup_s']:.1f} s; "
        f"to the first trial {_f(r['to_first_trial_s'])} s"
    )
    print(f"  trial-epochs {r['trial_epochs']}, best {r['metric']} {_f(r['best'], '{:.4f}')} ({r['best_trial']})")
    corr = ", ".join(
        f"epoch {x['epoch']} {_f(x['spearman'], '{:.2f}')} ({x['trials']} trials)" for x in r["rank_correlation"]
    )
    print(f"  Spearman rank correlation of {r['metric']} with epoch {r['max_epochs']}'s: {corr or '-'}")


def print_comparison(asha: dict, fifo: dict) -> None:
    print(
        f"\n=== ASHA vs FIFO: same search ({asha['num_samples']} trials, seed, points), {asha['concurrency']} at a time"
    )
    print(f"  {'scheduler':<10}{'trial-epochs':>13}{'best ' + asha['metric']:>16}{'wall s':>9}{'overhead':>10}")
    for r in (asha, fifo):
        print(
            f"  {r['scheduler']:<10}{r['trial_epochs']:>13}{_f(r['best'], '{:.4f}'):>16}{r['wall']:>9.1f}"
            f"{100 * r['overhead']:>9.1f}%"
        )
    ratio_e = asha["trial_epochs"] / fifo["trial_epochs"] if fifo["trial_epochs"] else float("nan")
    ratio_w = asha["wall"] / fifo["wall"]
    best_ratio = (asha["best"] / fifo["best"]) if asha["best"] is not None and fifo["best"] else None
    print(
        f"  ASHA / FIFO: trial-epochs {ratio_e:.2f}x, wall {ratio_w:.2f}x, best {asha['metric']} "
        f"{_f(best_ratio, '{:.2f}')}x ({_f(asha['best'], '{:.4f}')} vs {_f(fifo['best'], '{:.4f}')})"
    )
    a_pts, f_pts = {_point(t) for t in asha["trials"]}, {_point(t) for t in fifo["trials"]}
    print(f"  sampled points common to both studies: {len(a_pts & f_pts)} of {len(f_pts)}")
    final = {_point(t): t["metric"] for t in fifo["trials"]}
    for t in sorted(asha["trials"], key=lambda t: t["start"]):
        if t["status"] == "stopped_early" and final.get(_point(t)) is not None:
            print(
                f"    ASHA stopped {t['trial_id']} after {t['epochs']} epoch(s) at {_f(t['metric'], '{:.4f}')}; "
                f"FIFO trained the same point to {_f(final[_point(t)], '{:.4f}')}"
            )


def print_trial_process_comparison(old: dict, new: dict) -> None:
    def med(r):
        s = [t["startup_s"] for t in r["trials"] if t["startup_s"] is not None]
        return statistics.median(s) if s else None

    print(f"\n=== trial process: Ray Train per trial vs in the Tune trial ({new['scheduler']} run)")
    print(f"  {'path':<12}{'wall s':>9}{'overhead':>10}{'start-up median s':>19}{'trial-epochs':>14}")
    for label, r in (("ray_train", old), ("in-trial", new)):
        print(f"  {label:<12}{r['wall']:>9.1f}{100 * r['overhead']:>9.1f}%{_f(med(r)):>19}{r['trial_epochs']:>14}")
    print(f"  in-trial / ray_train: wall {new['wall'] / old['wall']:.2f}x")


def _point(trial: dict) -> tuple:
    def norm(v):
        try:
            return f"{float(v):.6g}"
        except (TypeError, ValueError):
            return str(v)

    return tuple(sorted((k, norm(v)) for k, v in trial["params"].items()))


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--study",
        type=Path,
        help=f"study YAML (default {QUICKSTART.relative_to(REPO)} if it exists, else the built-in study)",
    )
    parser.add_argument("--builtin", action="store_true", help="use the built-in small study")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a study or training config field, as `pisa study run --set`",
    )
    parser.add_argument("--num-samples", type=int, help="number of trials (overrides num_samples)")
    parser.add_argument("--compare-schedulers", action="store_true", help="run the same search with ASHA and with FIFO")
    parser.add_argument(
        "--compare-trial-process",
        action="store_true",
        help="first run the study with every trial on Ray Train (trial_process=ray_train, "
        "the old path), then as configured (1-worker trials in the Tune trial's process)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the studies' working dirs (MLflow stores)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    load_cwd = Path.cwd()
    data_root = None
    if args.study and not args.builtin:
        study_path = args.study.resolve()
    elif QUICKSTART.exists() and not args.builtin:
        study_path = QUICKSTART
        load_cwd = REPO  # `make demo` runs it from the repository root
    else:
        data_root = Path(tempfile.mkdtemp(prefix="pisa-bench-study-data-"))
        study_path = write_builtin_study(data_root)
    overrides = list(args.overrides)
    if args.num_samples:
        overrides.append(f"num_samples={args.num_samples}")

    import platform

    import torch

    print(f"study {study_path}; overrides {overrides or 'none'}")
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    results = []
    if args.compare_trial_process:
        results.append(run_one("raytrain", study_path, overrides + ["trial_process=ray_train"], args.keep, load_cwd))
        print_study(results[-1])
    if args.compare_schedulers:
        asha = run_one("asha", study_path, overrides + ["scheduler.type=asha"], args.keep, load_cwd)
        fifo = run_one("fifo", study_path, overrides + ["scheduler.type=fifo"], args.keep, load_cwd)
        results += [asha, fifo]
        for r in (asha, fifo):
            print_study(r)
        print_comparison(asha, fifo)
    else:
        results.append(run_one("run", study_path, overrides, args.keep, load_cwd))
        print_study(results[-1])
    if args.compare_trial_process:
        print_trial_process_comparison(results[0], results[1])
    if args.keep:
        for r in results:
            print(f"kept {r['workdir']} (MLflow: sqlite:///{r['workdir']}/mlflow.db)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if data_root is not None:
        import shutil

        shutil.rmtree(data_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
