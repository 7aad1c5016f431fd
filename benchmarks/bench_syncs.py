"""Count the ops that make the host wait for the device in one training step.

On a GPU every `.item()` / `float(tensor)` / `.tolist()` (`aten::_local_scalar_dense`),
`nonzero`, boolean-mask selection (`masked_select`) and `unique` blocks the host until the
device has caught up: a step with many of them is host-bound. A count needs no GPU: the
same ops run on CPU, and `torch.profiler` counts them there. A count is deterministic (not
a timing), so a test can hold it under a ceiling (tests/test_syncs.py).

One step = forward + backward + SGD step of `bench_step`'s models (same variants, same
batch), counted after one warm-up step. With `--engine`, also the training loop's whole
iteration (`pisa.training.engine._train_step`: the loss tally, the fused SGD with its
on-device skip flag) outside a logging step and at one (its one read of the tally):

    python benchmarks/bench_syncs.py                      # ResNet-18-FPN, frozen BN, 2 x 320 px
    python benchmarks/bench_syncs.py --json counts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import cast

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import Runner, make_batch, model_config, variants  # noqa: E402

from pisa.core.config import TrainConfig  # noqa: E402
from pisa.training.device_plan import plan_for  # noqa: E402

# the ops after which the host has the device's answer (each one a wait on a GPU)
SYNC_OPS = {
    "aten::_local_scalar_dense": "item",
    "aten::nonzero": "nonzero",
    "aten::masked_select": "masked_select",
    "aten::_unique2": "unique",
    "aten::unique_dim": "unique",
    "aten::unique_consecutive": "unique",
    "aten::_unique": "unique",
}


def count_syncs(runner: Runner, images, targets, seed: int) -> Counter:
    """The host-sync ops of one step of `runner`, by kind."""
    torch.manual_seed(seed)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step(images, targets)
    return _kinds(prof)


def _kinds(prof) -> Counter:
    """The host-sync ops a profile saw, by kind."""
    counts: Counter = Counter()
    for event in prof.events():
        kind = SYNC_OPS.get(event.name)
        if kind is not None:
            counts[kind] += 1
    return counts


def count_engine_syncs(runner: Runner, images, targets, seed: int) -> dict[str, int]:
    """The engine's iteration on `runner`'s model: its host syncs outside a logging step and
    at one, and the engine's own share of each (the iteration minus the model's step)."""
    from types import SimpleNamespace

    from pisa.core.config import TrainConfig as _Train
    from pisa.training.engine import Training, _check_finite, build_optimizer, train_step
    from pisa.training.faults import Faults
    from pisa.training.loss_tally import LossTally

    optimizer = build_optimizer(runner.model, _Train(lr=1e-4, base_batch=2, images_per_worker=2, workers=1).resolved())
    # the fields of a worker's `Training` that `train_step` reads: stand-ins, not the loop's whole state
    t = cast(
        Training,
        SimpleNamespace(
            model=runner.model,
            device=torch.device("cpu"),
            plan=runner.plan,
            optimizer=optimizer,
            scaler=None,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0),
            cfg=SimpleNamespace(train=SimpleNamespace(grad_clip=None)),
            iteration=0,
            rank=0,
            faults=Faults(),
            observe_loss=None,
        ),
    )
    tally = LossTally(torch.device("cpu"))
    train_step(t, tally, images, targets, 0)  # warm-up
    torch.manual_seed(seed)
    with profile(activities=[ProfilerActivity.CPU]) as plain:
        train_step(t, tally, images, targets, 1)
    torch.manual_seed(seed)
    with profile(activities=[ProfilerActivity.CPU]) as logging:
        train_step(t, tally, images, targets, 2)
        _check_finite(tally, 0, 0)
    model = sum(count_syncs(runner, images, targets, seed).values())
    step, at_log = sum(_kinds(plain).values()), sum(_kinds(logging).values())
    return {
        "model": model,
        "iteration": step,
        "iteration_logging": at_log,
        "engine": step - model,
        "engine_logging": at_log - model,
    }


def measure(args: argparse.Namespace) -> dict[str, dict[str, dict[str, int]]]:
    """{detector: {variant: {kind: count, "total": n}}}."""
    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    out: dict[str, dict[str, dict[str, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-syncs-") as tmp:
        images, targets = make_batch(args, Path(tmp))
    plan = plan_for(TrainConfig(amp=False, channels_last=False), device.type, 1)
    for detector in args.detectors:
        args.detector = detector
        out[detector] = {}
        for name, pisa in variants(detector).items():
            runner = Runner(model_config(args, **pisa), 3, device, args.seed, plan)
            runner.step(images, targets)  # warm-up: lazy initialisations are not per step
            counts = count_syncs(runner, images, targets, args.seed)
            out[detector][name] = {**dict(sorted(counts.items())), "total": sum(counts.values())}
            if args.engine:
                engine = count_engine_syncs(runner, images, targets, args.seed)
                out[detector][name].update({f"engine.{k}": v for k, v in engine.items()})
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detectors", nargs="+", default=["faster_rcnn", "retinanet"])
    p.add_argument("--backbone", default="resnet18_fpn")
    p.add_argument("--norm", default="frozen_bn")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--proposals", type=int, default=1000)
    p.add_argument("--rois", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the counts here")
    p.add_argument("--engine", action="store_true", help="also count the training loop's whole iteration")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = measure(args)
    print(f"host-sync ops per training step ({args.backbone}, {args.norm}, {args.batch} x {args.size} px)")
    print(f"{'detector':<12} {'variant':<18} {'total':>5}  by kind")
    for detector, by_variant in counts.items():
        for name, c in by_variant.items():
            kinds = ", ".join(f"{k} {v}" for k, v in c.items() if k != "total" and not k.startswith("engine."))
            print(f"{detector:<12} {name:<18} {c['total']:>5}  {kinds}")
            if "engine.iteration" in c:
                print(
                    f"{'':<12} {'  engine iteration':<18} {c['engine.iteration']:>5}  "
                    f"(the loop's own: {c['engine.engine']}; at a logging step {c['engine.iteration_logging']}, "
                    f"the loop's own {c['engine.engine_logging']})"
                )
    if args.json:
        args.json.write_text(json.dumps(counts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
