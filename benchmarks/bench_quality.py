"""Detection quality on BCCD: the random-sampling baseline against PISA, same budget, same seeds.

Every variant trains the same small detector (`configs/bccd_cpu.yaml`, optionally reduced
with `--set`) for the same number of epochs on the same images, once per seed, with
`pisa.training.train.run_training` (one Ray Train worker), and is evaluated on the same val
images. Variants:

  baseline  random RoI sampling, ISR-P off, CARL off
  pisa      the paper's defaults: ISR-P (k=2, b=0), CARL (k=1, b=0.2),
            ISR-N = Score-HLR sampling (k=0.5, b=0)
  isr_carl  ISR-P (k=2, b=0) and CARL (k=1, b=0.2) with random sampling: PISA without
            Score-HLR (the part that costs ~1.3x step time on a CPU)
  best      (with `--best best.yaml`, a config written by `pisa study best`) the PISA
            settings of that file (`model.sampler`, `model.isr_p`, `model.isr_n`,
            `model.carl`); everything else stays the base config's

The runs go round-robin over the seeds (seed 0 of every variant, then seed 1, ...) so
that load on the machine hits the variants alike and a run cut short by `--max-minutes`
leaves complete pairs. With `--parallel` the variants of a seed train at the same time
(a thread and a Ray Train run each, one local Ray): under changing load on a shared
machine every variant of a pair sees the same load, and an idle 2-core machine is used
fully (one training uses one core). The report gives the final-epoch val bbox_mAP and bbox_mAP_50 as
mean +- sample std over the seeds, and each variant's difference to the baseline (of the
means, and paired by seed). MLflow logs into a temporary SQLite store. With `--json`, the file is rewritten after every
finished training (runs so far, each with its per-epoch val history, plus the command,
commit and machine), so a run cut short still leaves data; `benchmarks/render_quality.py`
turns it into the table with confidence intervals and a plot.

    python benchmarks/bench_quality.py --seeds 0 1 2 \\
        --set train.epochs=3 --set train.milestones=[2] --set data.train_limit=120 --set data.val_limit=40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "bccd_cpu.yaml"
METRICS = ("bbox_mAP", "bbox_mAP_50")

BASELINE = ["model.sampler=random", "model.isr_p.enabled=false", "model.carl.enabled=false"]
PAPER = [
    "model.sampler=score_hlr",
    "model.isr_n.k=0.5",
    "model.isr_n.bias=0.0",
    "model.isr_p.enabled=true",
    "model.isr_p.k=2.0",
    "model.isr_p.bias=0.0",
    "model.carl.enabled=true",
    "model.carl.k=1.0",
    "model.carl.bias=0.2",
]
ISR_CARL = [
    "model.sampler=random",
    "model.isr_p.enabled=true",
    "model.isr_p.k=2.0",
    "model.isr_p.bias=0.0",
    "model.carl.enabled=true",
    "model.carl.k=1.0",
    "model.carl.bias=0.2",
]
PISA_KEYS = ("isr_p", "isr_n", "carl")
HISTORY_KEYS = ("bbox_mAP", "bbox_mAP_50", "train_loss", "time_train_s", "time_eval_s")


def best_overrides(path: Path) -> list[str]:
    """The PISA settings of a best-trial config, as overrides of the base config."""
    model = (yaml.safe_load(path.read_text()) or {}).get("model", {})
    out = [f"model.sampler={model['sampler']}"] if "sampler" in model else []
    for part in PISA_KEYS:
        for key, value in (model.get(part) or {}).items():
            out.append(f"model.{part}.{key}={json.dumps(value)}")
    if not out:
        raise SystemExit(f"{path}: no model.sampler / isr_p / isr_n / carl settings found")
    return out


def epoch_history(uri: str, run_id: str | None) -> dict[str, list[float]]:
    """Per-epoch values of HISTORY_KEYS from the run's MLflow history (ordered by epoch)."""
    if not run_id:
        return {}
    from pisa import tracking

    tracker = tracking.tracker(uri)
    out = {}
    for key in HISTORY_KEYS:
        points = sorted(tracker.metric_history(run_id, key), key=lambda m: m.step)
        out[key] = [m.value for m in points]
    return out


def machine() -> dict:
    import subprocess

    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "commit": commit,
    }


def write_json(path: Path, meta: dict, runs: list[dict]) -> None:
    """Atomic rewrite: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2, default=str))
    tmp.replace(path)


def data_overrides(bccd: Path) -> list[str]:
    return [
        f"data.train_images={bccd / 'images'}",
        f"data.train_annotations={bccd / 'train.json'}",
        f"data.val_images={bccd / 'images'}",
        f"data.val_annotations={bccd / 'val.json'}",
    ]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(mean: float | None, std: float | None, signed: bool = False) -> str:
    if mean is None:
        return "-"
    m = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return m + (f" +- {std:.4f}" if std is not None else "")


def report(runs: list[dict], variants: list[str], seeds: list[int]) -> None:
    ok = [r for r in runs if r["status"] == "FINISHED"]
    print(
        f"\n{'variant':<10}{'runs':>5}  "
        + "".join(f"{m + ' (mean +- std)':<28}" for m in METRICS)
        + "per seed "
        + METRICS[0]
        + "                min/run"
    )
    for v in variants:
        rows = [r for r in ok if r["variant"] == v]
        cells = "".join(f"{fmt(*mean_std([r['metrics'][m] for r in rows])):<28}" for m in METRICS)
        per_seed = " ".join(f"{r['seed']}:{r['metrics'][METRICS[0]]:.4f}" for r in rows)
        minutes = statistics.fmean(r["wall_s"] for r in rows) / 60 if rows else float("nan")
        print(f"{v:<10}{len(rows):>5}  {cells}{per_seed:<31}{minutes:.1f}")
    failed = [r for r in runs if r["status"] != "FINISHED"]
    for r in failed:
        print(f"  FAILED {r['variant']} seed {r['seed']}: {r.get('error')}")
    base = {r["seed"]: r for r in ok if r["variant"] == "baseline"}
    for v in variants:
        if v == "baseline":
            continue
        by_seed = {r["seed"]: r for r in ok if r["variant"] == v}
        paired = sorted(set(by_seed) & set(base))
        for m in METRICS:
            diff_means = None
            if by_seed and base:
                diff_means = statistics.fmean(r["metrics"][m] for r in by_seed.values()) - statistics.fmean(
                    r["metrics"][m] for r in base.values()
                )
            diffs = [by_seed[s]["metrics"][m] - base[s]["metrics"][m] for s in paired]
            wins = sum(d > 0 for d in diffs)
            print(
                f"{v} - baseline {m}: {fmt(diff_means, None, signed=True)} (difference of the means); "
                f"paired over {len(paired)} seed(s): {fmt(*mean_std(diffs), signed=True)}, "
                f"{v} ahead in {wins} of {len(paired)}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bccd", type=Path, default=REPO / "datasets" / "bccd", help="BCCD folder (images/, train.json, val.json)"
    )
    parser.add_argument("--config", type=Path, default=CONFIG, help="base training config")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the base config for every variant (repeatable)",
    )
    parser.add_argument("--best", type=Path, help="a config written by `pisa study best`: a third variant")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=["baseline", "pisa", "isr_carl", "best"],
        help="which variants to train (default: baseline, pisa, and best with --best)",
    )
    parser.add_argument("--max-minutes", type=float, help="start no new training after this many minutes")
    parser.add_argument(
        "--parallel", action="store_true", help="train the variants of a seed at the same time (one Ray Train run each)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the MLflow store and Ray results")
    parser.add_argument("--json", type=Path, help="write every run's metrics here, after each run")
    args = parser.parse_args()

    bccd = args.bccd.resolve()
    for needed in (bccd / "images", bccd / "train.json", bccd / "val.json"):
        if not needed.exists():
            raise SystemExit(f"BCCD not found: {needed} is missing (use --bccd DIR)")
    variants = {"baseline": BASELINE, "pisa": PAPER}
    if args.variants and "isr_carl" in args.variants:
        variants["isr_carl"] = ISR_CARL
    if args.best:
        variants["best"] = best_overrides(args.best)
    if args.variants:
        if "best" in args.variants and not args.best:
            raise SystemExit("variant 'best' needs --best best.yaml")
        variants = {k: variants[k] for k in args.variants}

    import torch

    from pisa.core.config import load_config
    from pisa.training.train import run_training

    work = Path(tempfile.mkdtemp(prefix="pisa-bench-quality-"))
    common = data_overrides(bccd) + list(args.overrides)
    tail = [
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        "tracking.experiment=bench-quality",
        f"storage_path={work / 'ray_results'}",
        "train.workers=1",
        "train.use_gpu=false",
    ]
    probe = load_config(args.config, common + tail)
    sched = probe.train.resolved()
    print(f"config {args.config} + {args.overrides or 'no overrides'}")
    print(
        f"budget per run: {sched.epochs} epochs, milestones {list(sched.milestones)}, "
        f"train_limit {probe.data.train_limit}, val_limit {probe.data.val_limit}, "
        f"{probe.train.workers} worker x {probe.train.images_per_worker} images, "
        f"{probe.model.min_size}-{probe.model.max_size} px, backbone {probe.model.backbone} "
        f"(pretrained: {probe.model.pretrained_backbone or 'no'})"
    )
    print("variants: " + "; ".join(f"{k}: {' '.join(v)}" for k, v in variants.items()))
    print(
        f"seeds {args.seeds}; torch {torch.__version__}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.1f}"
    )

    meta = {
        "argv": sys.argv,
        "config": str(args.config),
        "overrides": args.overrides,
        "seeds": args.seeds,
        "variants": {k: v for k, v in variants.items()},
        "budget": {k: getattr(sched, k) for k in ("epochs", "milestones", "scaled_lr", "warmup_iters", "total_batch")},
        "train_limit": probe.data.train_limit,
        "val_limit": probe.data.val_limit,
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **machine(),
    }
    runs: list[dict] = []
    start = time.time()
    stopped = False
    lock = threading.Lock()

    def train(name: str, over: list[str], seed: int) -> dict:
        # one SQLite store per variant: parallel trainings never write the same file
        store = [f"tracking.uri=sqlite:///{work / f'mlflow-{name}.db'}"]
        cfg = load_config(args.config, common + over + [f"train.seed={seed}"] + tail + store)
        t0 = time.time()
        outcome = run_training(cfg, run_name=f"{name}-seed{seed}", tags={"pisa.bench_variant": name})
        wall = time.time() - t0
        row: dict[str, Any] = {
            "variant": name,
            "seed": seed,
            "status": outcome.status,
            "wall_s": wall,
            "run_id": outcome.run_id,
            "error": outcome.error,
            "metrics": {
                m: outcome.metrics.get(m)
                for m in METRICS + ("epoch", "train_loss", "time_train_s", "time_eval_s", "images_per_sec")
            },
        }
        row["history"] = epoch_history(cfg.tracking.resolved_uri(), outcome.run_id)
        row["load_average"] = os.getloadavg()[0]
        with lock:
            runs.append(row)
            if args.json:
                write_json(args.json, meta, runs)
        print(
            f"[bench] {name} seed {seed}: {outcome.status} "
            + " ".join(f"{m}={row['metrics'][m]}" for m in METRICS)
            + f" in {wall:.0f} s (last epoch: "
            f"train {row['metrics']['time_train_s']} s, eval {row['metrics']['time_eval_s']} s)",
            flush=True,
        )
        return row

    if args.parallel:
        from pisa.training.ray_runtime import init_ray

        init_ray(num_cpus=max(os.cpu_count() or 1, len(variants)))  # one CPU slot per variant
    for seed in args.seeds:
        if args.max_minutes and (time.time() - start) / 60 >= args.max_minutes:
            stopped = True
            break
        if args.parallel:
            # every variant of a seed at once: they share the machine's load alike
            with ThreadPoolExecutor(len(variants)) as pool:
                list(pool.map(lambda item, s=seed: train(item[0], item[1], s), variants.items()))
            continue
        for name, over in variants.items():
            if args.max_minutes and (time.time() - start) / 60 >= args.max_minutes:
                stopped = True
                break
            train(name, over, seed)
        if stopped:
            break
    if stopped:
        print(f"\nstopped after {args.max_minutes} min: {len(runs)} of {len(args.seeds) * len(variants)} trainings ran")
    print(f"\ntotal {(time.time() - start) / 60:.1f} min")
    report(runs, list(variants), args.seeds)
    if args.json:
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json(args.json, meta, runs)
    if args.keep:
        print(f"kept {work} (MLflow: sqlite:///{work / 'mlflow.db'})")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["status"] == "FINISHED" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
