"""The whole `pisa` command line: sub-commands, their options and their handlers."""

from __future__ import annotations

import argparse

from .. import __version__
from . import commands, study_commands


def build_parser() -> argparse.ArgumentParser:
    """The whole command line in one place. Long, not complex: one declaration per
    sub-command and option, read top to bottom like `pisa --help`."""
    parser = argparse.ArgumentParser(
        prog="pisa",
        description="Hyperparameter studies of PISA detectors (Ray Train + Tune + Optuna + MLflow).",
    )
    parser.add_argument("--version", action="version", version=f"pisa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", metavar="ACTION")
    synth = data.add_parser("synth", help="generate the synthetic COCO-format dataset")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--train", type=int, default=64, help="training images")
    synth.add_argument("--val", type=int, default=16, help="validation images")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=128)
    synth.set_defaults(func=commands.data_synth)

    train = sub.add_parser("train", help="train one config with Ray Train, tracked in MLflow")
    train.add_argument("config", help="training config YAML")
    _add_set(train)
    train.add_argument("--workers", type=int, help="Ray Train workers (default: the config's, 8)")
    train.add_argument("--cpu", action="store_true", help="train on CPU workers (gloo backend)")
    train.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    train.add_argument("--resume", help="checkpoint directory or file to continue from")
    train.add_argument("--run-name", help="MLflow run name")
    train.add_argument("-v", "--verbose", action="store_true", help="show Ray's own output on the console")
    _add_register(train, "the config's name")
    train.set_defaults(func=commands.train)

    study = sub.add_parser("study", help="hyperparameter studies (Ray Tune + Optuna)").add_subparsers(
        dest="study_command", metavar="ACTION"
    )
    run = study.add_parser("run", help="run a study file")
    run.add_argument("study", help="study YAML (see studies/)")
    _add_set(run)
    run.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    run.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's own output (worker logs, Tune's result tables) on the console",
    )
    run.add_argument(
        "--warm-start",
        metavar="STUDY",
        help="seed the searcher with this study's finished trials (same search space; e.g. a pilot at "
        "fewer epochs): its best point first, then the sampler's model",
    )
    run.set_defaults(func=study_commands.study_run)
    plan = study.add_parser("plan", help="what a study will cost (GPU-hours, wall time) before it starts")
    plan.add_argument("study", help="study YAML (see studies/)")
    _add_set(plan)
    plan.add_argument(
        "--gpus", type=int, metavar="N", help="assume a cluster of N GPUs (no Ray is started); default: this machine"
    )
    plan.add_argument(
        "--probe", action="store_true", help="time a few training steps on this machine's device for the rate"
    )
    plan.add_argument("--address", help="Ray cluster address whose resources the trials share (default: this machine)")
    plan.add_argument(
        "--gpu-mem",
        type=float,
        metavar="GIB",
        help="pack: auto: assume GPUs of GIB GiB (resources_per_trial.gpu_mem_gib); default: this machine's GPU",
    )
    plan.add_argument(
        "--images",
        type=int,
        metavar="N",
        help="the training set's images (before data.train_limit); default: counted from the train "
        "annotation file, else the known size of a standard set (COCO 2017); no image file is needed",
    )
    plan.add_argument(
        "--gpu-type",
        metavar="TYPE",
        help="price from the measured rate of this GPU type in benchmarks/data/rates.csv (e.g. h200) "
        "when there is no probe and no earlier run",
    )
    plan.add_argument("--price", type=float, metavar="USD", help="USD per GPU-hour (CPU-hour for CPU trials): the bill")
    plan.set_defaults(func=study_commands.study_plan)
    resume = study.add_parser("resume", help="continue an interrupted study")
    resume.add_argument("name", help="study name (or its directory)")
    resume.add_argument("--storage-path", default="ray_results")
    resume.add_argument("--address")
    resume.add_argument(
        "--retry-failed", action="store_true", help="also continue failed trials from their last checkpoint"
    )
    resume.add_argument("-v", "--verbose", action="store_true", help="show Ray's own output on the console")
    resume.set_defaults(func=study_commands.study_resume)
    extend = study.add_parser(
        "extend", help="add trials to a finished or interrupted study (same Optuna study and MLflow run)"
    )
    extend.add_argument("name", help="study name (or its directory)")
    extend.add_argument("--add", type=int, required=True, metavar="N", help="trials to add")
    extend.add_argument("--storage-path", default="ray_results")
    extend.add_argument("--address")
    extend.add_argument("-v", "--verbose", action="store_true", help="show Ray's own output on the console")
    extend.set_defaults(func=study_commands.study_extend)
    best = study.add_parser("best", help="rank the trials; write the best trial's config")
    best.add_argument("name")
    best.add_argument("--storage-path", default="ray_results")
    best.add_argument("--out", help="write the best trial's training config here (e.g. best.yaml)")
    _add_register(best, "the study's name")
    listing = study.add_parser("list", help="the studies under a storage path: status, trials, best metric")
    listing.add_argument("--storage-path", default="ray_results")
    listing.set_defaults(func=study_commands.study_list)
    repair = study.add_parser(
        "repair", help="rebuild a damaged or missing study state (pisa_study.json) from the study's MLflow run"
    )
    repair.add_argument("name", help="study name (or its directory)")
    repair.add_argument("--storage-path", default="ray_results")
    repair.add_argument(
        "--tracking-uri", help="the study's MLflow store, when neither the file nor Tune's state names it"
    )
    repair.add_argument("--run-id", help="the study's own MLflow run, when several runs carry its name")
    repair.set_defaults(func=study_commands.study_repair)
    best.set_defaults(func=study_commands.study_best)
    val = study.add_parser(
        "validate",
        help="retrain the top points, the baseline and the paper's defaults "
        "over N seeds; compare with confidence intervals",
    )
    val.add_argument("name", help="study name (or its directory)")
    val.add_argument("--top", type=int, default=3, help="how many of the best trials to re-check (default 3)")
    val.add_argument("--seeds", type=int, default=5, help="seeds per variant, the same for all (default 5)")
    val.add_argument(
        "--first-seed", type=int, help="first seed (default: the one after the seeds the study trained with)"
    )
    val.add_argument("--storage-path", default="ray_results")
    val.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    val.add_argument("-v", "--verbose", action="store_true", help="show the trainings' and Ray's output")
    val.set_defaults(func=study_commands.study_validate)
    report = study.add_parser("report", help="(re)make the study's plots and tables in MLflow")
    report.add_argument("name")
    report.add_argument("--storage-path", default="ray_results")
    report.set_defaults(func=study_commands.study_report)

    cmp = sub.add_parser("compare", help="train configs on the same seeds; compare each with the first, with intervals")
    cmp.add_argument("configs", nargs="+", metavar="CONFIG", help="training config YAMLs; the first is the reference")
    _add_grid_options(cmp, "compare-<time>")
    cmp.set_defaults(func=commands.compare)

    paper = sub.add_parser("paper", help="the paper's table: each PISA config against its baseline, over N seeds")
    paper.add_argument(
        "--detectors",
        default="all",
        help="comma-separated rows (faster_rcnn_r50, retinanet_r50, ...) or all (default)",
    )
    paper.add_argument("--configs", default="configs", help="directory of the paired configs (default configs/)")
    _add_grid_options(paper, "paper-<time>")
    paper.set_defaults(func=commands.paper)

    pred = sub.add_parser("predict", help="run a trained detector on images: COCO results JSON, drawn PNGs")
    pred.add_argument("model", help="models:/NAME@champion, an MLflow run id, or a checkpoint file/directory")
    pred.add_argument("images", nargs="+", help="image files")
    pred.add_argument("--out", help="COCO results JSON to write (e.g. preds.json)")
    pred.add_argument("--draw", metavar="DIR", help="write each image with its detections drawn, as DIR/NAME.png")
    pred.add_argument("--score-thr", type=float, default=0.3, help="keep detections scoring at least this (0.3)")
    pred.add_argument("--annotations", help="COCO file whose image ids the results should use")
    pred.add_argument(
        "--tracking-uri", help="MLflow store of models:/ URIs and run ids (default: MLFLOW_TRACKING_URI or ./mlflow.db)"
    )
    pred.set_defaults(func=commands.predict)

    rep = sub.add_parser("reproduce", help="retrain a run's config (RUN_ID or best.yaml) and compare")
    rep.add_argument("source", help="an MLflow run id or a config YAML written by `pisa study best`")
    rep.add_argument("--tracking-uri", help="where RUN_ID lives (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    rep.add_argument("--address")
    _add_set(rep)
    rep.set_defaults(func=commands.reproduce)
    return parser


def _add_register(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--register",
        nargs="?",
        const="",
        default=None,
        metavar="MODEL_NAME",
        help=f"log the weights as an MLflow model, register it (default name: {default}) and set its alias 'champion'",
    )


def _add_grid_options(p: argparse.ArgumentParser, default_name: str) -> None:
    """What `compare` and `paper` share: seeds, overrides, name, storage, metric, cluster."""
    p.add_argument("--seeds", type=int, default=3, help="seeds per config, the same for all (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    _add_set(p)
    p.add_argument("--name", help=f"name (default {default_name}); the same name again continues a cut-short run")
    p.add_argument("--storage-path", default="ray_results")
    p.add_argument("--metric", default="bbox_mAP", help="the final-epoch metric compared (default bbox_mAP)")
    p.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the trainings' and Ray's output")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.isr_p.k=1.5 (repeatable)",
    )
