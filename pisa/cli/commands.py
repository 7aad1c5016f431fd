"""The other `pisa` commands: train, predict, reproduce, compare, paper, data synth."""

from __future__ import annotations

import argparse
import sys
import time
from typing import cast

from .study_commands import print_registered


def train(args: argparse.Namespace) -> int:
    from ..core.config import load_config
    from ..tracking.tags import RunStatus
    from ..training.train import run_training

    overrides = list(args.overrides)
    if args.workers:
        overrides.append(f"train.workers={args.workers}")
    if args.cpu:
        overrides.append("train.use_gpu=false")
    cfg = load_config(args.config, overrides)
    outcome = run_training(
        cfg,
        address=args.address,
        run_name=args.run_name,
        resume_from=args.resume,
        verbose=args.verbose,
        source=str(args.config),
    )
    print(outcome.to_json())
    if outcome.status != RunStatus.FINISHED:
        return 1
    if args.register is not None and not outcome.checkpoint_dir:
        print("nothing to register: the training left no checkpoint", file=sys.stderr)
        return 1
    if args.register is not None:
        from ..tracking.registry import log_detector_model

        registered = log_detector_model(
            cfg.tracking.resolved_uri(),
            cast(str, outcome.run_id),
            cast(str, outcome.checkpoint_dir),
            args.register or cfg.name,
        )
        print_registered(registered)
    return 0


def data_synth(args: argparse.Namespace) -> int:
    from ..core.errors import ConfigError
    from ..data.synthetic import MIN_IMAGE_SIZE, synth_command

    for option, value, least in (
        ("--train", args.train, 1),
        ("--val", args.val, 1),
        ("--image-size", args.image_size, MIN_IMAGE_SIZE),
    ):
        if value < least:
            raise ConfigError(f"{option} {value}: must be at least {least}")
    synth_command(args.out, args.train, args.val, args.seed, args.image_size)
    return 0


def predict(args: argparse.Namespace) -> int:
    from ..tracking.predict import predict_files

    run = predict_files(
        args.model,
        args.images,
        out=args.out,
        draw_dir=args.draw,
        score_thr=args.score_thr,
        annotations=args.annotations,
        tracking_uri=args.tracking_uri,
    )
    print(
        f"{len(run.results)} detections (score >= {args.score_thr}) in {run.num_images} images"
        + (f"; wrote {args.out}" if args.out else "")
        + (f"; drew {len(run.drawn)} images into {args.draw}" if args.draw else "")
    )
    if not args.out and not args.draw:
        import json

        print(json.dumps(run.results))
    return 0


def reproduce(args: argparse.Namespace) -> int:
    from ..comparisons.reproduce import format_comparison, reproduce
    from ..tracking.tags import RunStatus

    result = reproduce(args.source, tracking_uri=args.tracking_uri, address=args.address, overrides=args.overrides)
    print(format_comparison(result))
    return 0 if result.status == RunStatus.FINISHED else 1


def compare(args: argparse.Namespace) -> int:
    from ..comparisons.compare import load_entries, run_compare, seed_list
    from ..comparisons.table import format_per_class, format_validation

    entries = load_entries(args.configs, args.overrides)
    result = run_compare(
        entries,
        seeds=seed_list(args.seeds, args.first_seed),
        name=args.name,
        storage_path=args.storage_path,
        metric=args.metric,
        address=args.address,
        verbose=args.verbose,
    )
    print(format_validation(result))
    print(format_per_class(result), end="")
    print(f"logged to MLflow run {result.run_id} ({result.tracking_uri})")
    return 0 if result.ok else 1


def paper(args: argparse.Namespace) -> int:
    from ..comparisons.compare import run_compare, seed_list
    from ..comparisons.paper import format_paper, log_paper, paper_entries, paper_rows

    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    entries, pairs = paper_entries(args.configs, detectors, args.overrides)
    result = run_compare(
        entries,
        seeds=seed_list(args.seeds, args.first_seed),
        name=args.name or f"paper-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=args.storage_path,
        metric=args.metric,
        address=args.address,
        verbose=args.verbose,
        title="PISA vs baseline",
    )
    rows = paper_rows(result, entries, pairs)
    log_paper(result, rows)
    print(format_paper(result, rows))
    print(f"logged to MLflow run {result.run_id} ({result.tracking_uri})")
    return 0 if result.ok else 1
