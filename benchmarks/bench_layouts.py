"""One global batch, several layouts: how far apart do their training losses go?

A packed trial (`resources_per_trial: {pack: auto}`) trains the paper's total batch on fewer
workers with more images each. With frozen BN and per-image draws (`pisa.data.draws`) that is
the same optimisation up to floating point; this measures it. Each layout (W workers x b
images, W*b the same) runs the engine's own loop (`pisa.training.engine.run_worker`) for the
given steps in real processes, DDP over gloo as Ray Train sets it up, one thread each, and
records every step's loss; a layout's loss at a step is the mean of its workers' (what DDP's
averaged gradient descends). Printed: each layout's largest relative gap to the first layout,
at the first step and over all steps, and the same for another seed (the scale of a real
difference).

    python benchmarks/bench_layouts.py                 # baseline: random sampler, no ISR-P/CARL
    python benchmarks/bench_layouts.py --pisa          # ISR-P + CARL on (normalised per worker)

tests/test_layouts.py runs the baseline and holds the gaps under a justified tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pisa.core.small_configs import SMALL_FASTER_RCNN
from pisa.training.engine import run_worker

LAYOUTS = {"1x4": (1, 4), "2x2": (2, 2), "4x1": (4, 1)}


class RecordingSession:
    """A `TrainSession` for one process of a torch.distributed group: each step's loss kept."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world_size = rank, world
        self.losses: list[torch.Tensor] = []

    def device(self) -> torch.device:
        return torch.device("cpu")

    def prepare_model(self, model, find_unused_parameters: bool, broadcast_buffers: bool = True):
        if self.world_size == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=find_unused_parameters, broadcast_buffers=broadcast_buffers
        )

    def report(self, metrics, checkpoint_dir) -> None:
        pass

    def restored_checkpoint(self):
        return contextlib.nullcontext(None)

    def stop_on(self, error) -> None:
        raise error

    def record_loss(self, loss: torch.Tensor, iteration: int) -> None:
        self.losses.append(loss.detach().clone())


def experiment(
    synthetic_out: Path, work: Path, workers: int, images: int, seed: int = 0, steps: int = 20, pisa: bool = False
) -> dict[str, Any]:
    """A small from-scratch Faster R-CNN (MobileNetV3-FPN, frozen BN, 96 px) on the synthetic
    shapes: 20 training images, so `steps` steps of 4 images are `steps / 5` epochs."""
    if steps % 5:
        raise ValueError(f"steps must be a multiple of 5 (epochs of 5 steps), got {steps}")
    return {
        "name": "layouts",
        "model": {
            **SMALL_FASTER_RCNN,
            "norm": "frozen_bn",
            "sampler": "score_hlr" if pisa else "random",
            "isr_p": {"enabled": pisa},
            "carl": {"enabled": pisa},
        },
        "data": {"synthetic": {"out": str(synthetic_out), "train": 24, "val": 8}, "train_limit": 20, "val_limit": 1},
        "train": {
            "schedule": "custom",
            "epochs": steps // 5,
            "lr": 0.01,
            "base_batch": 4,
            "milestones": [],
            "warmup_iters": 2,
            "workers": workers,
            "use_gpu": False,
            "images_per_worker": images,
            "log_every": 5,
            "seed": seed,
        },
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "layouts"},
        "storage_path": str(work / "ray_results"),
    }


def _run_process(index: int, jobs: list[tuple[str, int, int, dict]], out: str) -> None:
    """Process `index` of all layouts' processes: one rank of one layout."""
    name, rank, world, config = jobs[index]
    torch.set_num_threads(1)  # many processes on a small machine, and one summation order per op
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{Path(out) / f'{name}.init'}", rank=rank, world_size=world)
    session = RecordingSession(rank, world)
    try:
        error = run_worker({"experiment": config}, session, observe_loss=session.record_loss)
        if error is not None:
            raise RuntimeError(error)
        torch.save(torch.stack(session.losses), Path(out) / f"{name}-{rank}.pt")
    finally:
        if world > 1:
            dist.destroy_process_group()


def layout_losses(runs: dict[str, dict[str, Any]], out: Path) -> dict[str, torch.Tensor]:
    """Each run's (an experiment dict) per-step loss, mean over its workers; all runs' processes
    at once (spawned: a fresh interpreter each, as a Ray worker is)."""
    jobs = [
        (name, rank, cfg["train"]["workers"], cfg)
        for name, cfg in runs.items()
        for rank in range(cfg["train"]["workers"])
    ]
    # a spawned process imports `_run_process` by its module's name, from this folder when the
    # module was loaded from its file (tests/test_layouts.py) rather than run as the script
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    mp.start_processes(_run_process, args=(jobs, str(out)), nprocs=len(jobs), start_method="spawn")
    losses = {}
    for name, cfg in runs.items():
        ranks = range(cfg["train"]["workers"])
        per_rank = torch.stack([torch.load(out / f"{name}-{r}.pt", weights_only=True) for r in ranks])
        losses[name] = per_rank.double().mean(0)
    return losses


def relative_gaps(losses: dict[str, torch.Tensor], reference: str) -> dict[str, dict[str, float]]:
    """Each run's largest relative gap to `reference`: at the first step and over all steps."""
    ref = losses[reference]
    gaps = {}
    for name, loss in losses.items():
        if name != reference:
            rel = (loss - ref).abs() / ref.abs()
            gaps[name] = {"first_step": float(rel[0]), "max": float(rel.max()), "argmax_step": int(rel.argmax()) + 1}
    return gaps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pisa", action="store_true", help="ISR-P + ISR-N + CARL on (default: the random baseline)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write the losses and gaps here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-layouts-") as tmp:
        work = Path(tmp)
        runs = {
            name: experiment(work / "synthetic", work, w, b, steps=args.steps, pisa=args.pisa)
            for name, (w, b) in LAYOUTS.items()
        }
        runs["1x4 seed 1"] = experiment(work / "synthetic", work, 1, 4, seed=1, steps=args.steps, pisa=args.pisa)
        from pisa.core.config import SyntheticConfig
        from pisa.data import ensure_synthetic  # generated once here, not by each process

        ensure_synthetic(SyntheticConfig(out=work / "synthetic", train=24, val=8))
        losses = layout_losses(runs, work)
    gaps = relative_gaps(losses, "1x4")
    variant = "PISA (ISR-P + ISR-N + CARL)" if args.pisa else "baseline (random sampler)"
    print(f"{variant}, {args.steps} steps of 4 images, frozen BN: largest relative loss gap to 1x4")
    for name, gap in gaps.items():
        print(f"  {name:>10}: step 1 {gap['first_step']:.2e}, all steps {gap['max']:.2e} (step {gap['argmax_step']})")
    if args.json:
        payload = {"losses": {k: v.tolist() for k, v in losses.items()}, "gaps": gaps, "pisa": args.pisa}
        args.json.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
