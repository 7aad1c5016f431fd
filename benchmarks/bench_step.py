"""Time one training step of a detector with PISA against the same detector without it.

A step is forward + backward + SGD step on one batch. The variants are built from the
same seed (identical weights), see the same batch, and are timed round-robin (one step
of each variant per round), so machine noise hits them alike; the report gives the
median step time of each variant and its ratio to the baseline, measured in this run.

Variants:
  baseline       random RoI sampling (two-stage) / plain focal loss (RetinaNet), no ISR-P, no CARL
  isr_p+carl     ISR-P reweighting of positives + CARL
  isr_p+carl+isr_n  the same + ISR-N (Score-HLR sampling of negatives; two-stage only); the
                 sampled RoIs reuse the ranking pass's pooled features and head outputs
  isr_n_2nd_pass the same, with a second pooling + box-head pass over the sampled RoIs
                 (`--second-pass`: the cost the reuse saves)
  float_input    the baseline fed float32 images in [0, 1], as the loader made them before it
                 handed over uint8 (`--float-input`: the old data path; every other variant
                 gets uint8 images and scales them on the device)

After the table, a loader line: the training data loader alone (its dataset, transforms and
`data.num_workers`; `--config` for a config's data, else the synthetic set at `--size`) over
`--loader-batches` batches, in img/s beside the steps' img/s, and whether the step would wait
for it (data-bound: loader img/s < step img/s). `--loader-batches 0` skips it.

    python benchmarks/bench_step.py --device cpu --backbone mobilenet_v3_fpn --size 256 \\
        --proposals 500 --rois 128 --steps 20
    python benchmarks/bench_step.py --device cuda              # paper sizes: 2000 proposals, 512 RoIs

On CUDA the steps run as training runs them (`pisa.training.device_plan`): fp16 autocast with a GradScaler
and a channels_last model, timed between `torch.cuda.synchronize()` calls; img/s is reported
too. `--amp` and `--channels-last` turn the same on for CPU (bfloat16 autocast there).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torchvision.transforms.v2.functional import to_dtype

from pisa.core.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, load_config
from pisa.data import collate_fn, generate_synthetic
from pisa.data.coco import CocoDetection
from pisa.data.transforms import build_transforms
from pisa.models import build_detector
from pisa.models.roi_heads import PisaRoIHeads
from pisa.training.device_plan import DevicePlan, apply_channels_last, make_grad_scaler, optimizer_step, plan_for
from pisa.training.loaders import build_train_loader, build_train_set, loader_images_per_sec


def variants(detector: str, second_pass: bool = False, float_input: bool = False) -> dict[str, dict]:
    out = {
        "baseline": dict(sampler="random", isr_p={"enabled": False}, carl={"enabled": False}),
        "isr_p+carl": dict(sampler="random", isr_p={"enabled": True}, carl={"enabled": True}),
    }
    if detector == "faster_rcnn":
        out["isr_p+carl+isr_n"] = dict(sampler="score_hlr", isr_p={"enabled": True}, carl={"enabled": True})
        if second_pass:
            out["isr_n_2nd_pass"] = dict(out["isr_p+carl+isr_n"])
    if float_input:
        out["float_input"] = dict(out["baseline"])
    return out


def model_config(args: argparse.Namespace, **pisa) -> ModelConfig:
    return ModelConfig(
        detector=args.detector,
        backbone=args.backbone,
        norm=args.norm,
        min_size=args.size,
        max_size=args.size,
        rpn_pre_nms_top_n_train=args.proposals,
        rpn_post_nms_top_n_train=args.proposals,
        rois_per_image=args.rois,
        diagnostics=False,
        **pisa,
    )


def make_batch(args: argparse.Namespace, work: Path):
    """`args.batch` synthetic shapes images of `args.size` px with their targets (uint8 images,
    as the training loader hands them over)."""
    generate_synthetic(work, n_train=args.batch, n_val=1, seed=args.seed, image_size=args.size)
    ds = CocoDetection(work / "train", work / "train.json", transforms=build_transforms(train=False))
    return collate_fn([ds[i] for i in range(len(ds))])


def loader_config(args: argparse.Namespace, work: Path) -> ExperimentConfig:
    """`--config`'s experiment, or the synthetic set at `--size` with `--loader-workers` and the
    flip preset, `--batch` images per batch."""
    if args.config:
        return load_config(args.config)
    batches = args.loader_batches + 1 + 2 * args.loader_workers  # and the first and prefetched ones
    synthetic = {"out": work / "loader", "train": args.batch * batches, "val": 1}
    data = DataConfig(synthetic={**synthetic, "image_size": args.size}, num_workers=args.loader_workers)
    return ExperimentConfig(model=model_config(args), data=data, train=TrainConfig(images_per_worker=args.batch))


def loader_rate(cfg: ExperimentConfig, device_type: str, batches: int) -> float:
    """The training loader of `cfg` alone: img/s over `batches` batches (`loader_images_per_sec`)."""
    plan = plan_for(cfg.train, device_type, 1)
    return loader_images_per_sec(build_train_loader(build_train_set(cfg), cfg, 0, 1, plan), batches)


def print_loader_line(cfg: ExperimentConfig, rate: float, step_rates: dict[str, float]) -> None:
    """The loader's img/s beside the steps', and which variants it would hold back."""
    bound = [name for name, step in step_rates.items() if rate < step]
    verdict = f"DATA-BOUND for {', '.join(bound)}" if bound else "not data-bound"
    where = cfg.data.synthetic.out if cfg.data.synthetic else cfg.data.train_images
    print(
        f"loader: {rate:.2f} img/s ({where}, augment {cfg.data.augment}, {cfg.data.num_workers} workers, "
        f"{cfg.train.images_per_worker} img/batch) vs step {min(step_rates.values()):.2f}-"
        f"{max(step_rates.values()):.2f} img/s: {verdict}"
    )


class Runner:
    """One variant: its model, optimizer and the training's device plan (AMP, scaler, format)."""

    def __init__(self, cfg: ModelConfig, num_classes: int, device: torch.device, seed: int, plan: DevicePlan):
        torch.manual_seed(seed)
        self.model = build_detector(cfg, num_classes=num_classes).to(device).train()
        self.device_type = device.type
        self.cuda = device.type == "cuda"
        self.plan = plan
        if plan.channels_last:  # on the model: the per-image inputs are 3-D, batched inside it
            self.model = apply_channels_last(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # a small LR keeps the variants' weights close over the run
        self.optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        self.scaler = make_grad_scaler(plan)
        self.times: list[float] = []

    def step(self, images, targets) -> float:
        """One timed training step (forward, backward, SGD)."""
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(self.device_type, dtype=self.plan.autocast_dtype, enabled=self.plan.amp):
            losses = self.model(images, targets)
        loss = sum(losses.values())
        optimizer_step(loss, self.model, self.optimizer, self.scaler, grad_clip=None)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", choices=("faster_rcnn", "retinanet"), default="faster_rcnn")
    parser.add_argument(
        "--backbone",
        default="resnet50_fpn",
        choices=("resnet50_fpn", "resnet18_fpn", "mobilenet_v3_fpn", "resnext101_32x4d_fpn"),
    )
    parser.add_argument("--norm", default="bn", choices=("bn", "gn", "frozen_bn"))
    parser.add_argument("--size", type=int, default=800, help="image side (min_size = max_size)")
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--proposals", type=int, default=2000, help="RPN proposals per image (train)")
    parser.add_argument("--rois", type=int, default=512, help="RoIs sampled per image")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (one step of each variant)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--second-pass",
        action="store_true",
        help="also time ISR-N with a second head pass over the sampled RoIs (no reuse)",
    )
    parser.add_argument(
        "--float-input",
        action="store_true",
        help="also time the baseline fed float32 images (the data path before uint8 images)",
    )
    parser.add_argument("--loader-batches", type=int, default=5, help="batches the loader is timed over (0: skip)")
    parser.add_argument("--loader-workers", type=int, default=0, help="loader workers without --config")
    parser.add_argument("--config", type=Path, help="time this experiment's training loader (its data and workers)")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="autocast (default: on CUDA only; bfloat16 on CPU)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last model (default: on CUDA only)",
    )
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        images, targets = make_batch(args, Path(tmp))
        cfg = loader_config(args, Path(tmp))
        rate = loader_rate(cfg, device.type, args.loader_batches) if args.loader_batches > 0 else None
    num_classes = 3
    float_images = [to_dtype(img, torch.float32, scale=True).to(device) for img in images]
    images = [img.to(device) for img in images]  # 3-D: the model batches them
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    auto = lambda flag: "auto" if flag is None else flag  # noqa: E731
    plan = plan_for(TrainConfig(amp=auto(args.amp), channels_last=auto(args.channels_last)), device.type, 1)

    runners = {
        name: Runner(model_config(args, **pisa), num_classes, device, args.seed, plan)
        for name, pisa in variants(args.detector, args.second_pass, args.float_input).items()
    }
    if "isr_n_2nd_pass" in runners:
        heads = runners["isr_n_2nd_pass"].model.roi_heads
        assert isinstance(heads, PisaRoIHeads)
        heads.reuse_ranking_pass = False

    for rnd in range(args.warmup + args.steps):
        for name, runner in runners.items():
            torch.manual_seed(args.seed + rnd)  # same random sampling draws for every variant
            t = runner.step(float_images if name == "float_input" else images, targets)
            if rnd >= args.warmup:
                runner.times.append(t)

    where = (
        torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    )
    amp = (f", {str(plan.autocast_dtype).removeprefix('torch.')} autocast" if plan.amp else "") + (
        " + channels_last" if plan.channels_last else ""
    )
    rois = f"{args.proposals} proposals, {args.rois} RoIs/img; " if args.detector == "faster_rcnn" else ""
    print(
        f"{args.detector} / {args.backbone} ({args.norm}), {args.batch} x {args.size}px, "
        f"{rois}{args.steps} rounds after {args.warmup} "
        f"warm-up; torch {torch.__version__} on {args.device} ({where}{amp})"
    )
    base = runners["baseline"].times
    base_med = statistics.median(base)
    print(f"{'variant':<18} {'median ms':>10} {'min ms':>8} {'img/s':>7} {'ratio':>7} {'paired':>7}")
    for name, runner in runners.items():
        med = statistics.median(runner.times)
        paired = statistics.median(t / b for t, b in zip(runner.times, base))
        print(
            f"{name:<18} {med * 1e3:10.1f} {min(runner.times) * 1e3:8.1f} {args.batch / med:7.2f} "
            f"{med / base_med:6.3f}x {paired:6.3f}x"
        )
    print("ratio: median step time / baseline median; paired: median over rounds of step / baseline step")
    if "float_input" in runners:
        paired = statistics.median(b / f for b, f in zip(base, runners["float_input"].times))
        print(f"uint8 input (scaled in the model) / float input (the old path), paired: {paired:.3f}x")
    if rate is not None:
        print_loader_line(cfg, rate, {name: args.batch / statistics.median(r.times) for name, r in runners.items()})


if __name__ == "__main__":
    main()
