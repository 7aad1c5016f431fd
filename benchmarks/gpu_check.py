"""Check the GPU training path end to end on this machine, and fail loudly on any error.

    make gpu-check                                         # every GPU of this machine
    python benchmarks/gpu_check.py --gpus 2 --out gpu_check.json
    python benchmarks/gpu_check.py --device cpu --dry-run  # the same code, tiny sizes, on CPU

1. Each paper detector (Faster and Mask R-CNN R-50-FPN, RetinaNet R-50-FPN, SSD300, SSD512,
   from the configs/ of the paper set-ups; random init with trainable BN, since nothing is
   downloaded) trains `--iters` iterations on one device with the engine's device plan:
   AMP (fp16 + GradScaler on GPU, bfloat16 on CPU), channels_last, the paper's input size
   and images per GPU, 80 classes. It prints img/s per GPU (after warm-up) and the peak
   memory. The batch is what the training loader hands over: uint8 images (the model scales
   them on the device), SSD's already at its square input. Beside it, the training loader
   alone (the config's augmentation, images per GPU and `data.num_workers`; its data when it is
   here, else BCCD's 640x480 photos, else generated ones) over `--loader-batches` batches, and
   whether the step would wait for it (data-bound: loader img/s < step img/s).
2. `pisa train` of Faster R-CNN PISA through Ray Train on `--gpus` workers (NCCL for the
   gradients and gloo for the CPU collectives; SyncBatchNorm, DDP and 2 loader workers per
   GPU when there are 2+), 2 short epochs on a generated data set at the paper's image size,
   then a resume from epoch 1's checkpoint, compared with the uninterrupted run: on a GPU the
   resumed run's first iteration's loss within 0.1% of the uninterrupted run's (it was identical
   on an H200) and epoch 2's train_loss within 5% (the measured drift: 1-4%, from the atomics of
   some backward kernels); on CPU (`--dry-run`) the same to 1e-6.

On a GPU (not `--dry-run`) each detector that passed appends a row to the reference rates
`pisa study plan --gpu-type` prices from (`benchmarks/data/rates.csv`, `--rates`; `--no-rates`
leaves it alone): its img/s and peak memory with the GPU type, precision, layout, commit,
command, date and the training step's source hash (`pisa.planning.reference_rates`).

Anything that raises, a non-finite loss, a GradScaler that never finds a finite step, or a
training that does not finish makes the check exit 1, naming what failed. A full run on
8 GPUs takes a few minutes (most of it starting Ray and the detectors' first iterations).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pisa.core.config import DataConfig, ExperimentConfig, TrainConfig, load_config
from pisa.models import build_detector, fixed_input_size
from pisa.planning import reference_rates
from pisa.training.device_plan import (
    DevicePlan,
    apply_channels_last,
    make_grad_scaler,
    optimizer_step,
    plan_for,
)
from pisa.training.engine import build_optimizer
from pisa.training.loaders import build_train_loader, build_train_set, loader_images_per_sec

# detector name -> the paper config it is built from
DETECTORS = {
    "faster_rcnn_r50_fpn": "faster_rcnn_r50_fpn_1x_pisa.yaml",
    "mask_rcnn_r50_fpn": "mask_rcnn_r50_fpn_1x_pisa.yaml",
    "retinanet_r50_fpn": "retinanet_r50_fpn_1x_pisa.yaml",
    "ssd300": "ssd300_pisa.yaml",
    "ssd512": "ssd512_pisa.yaml",
}
COCO_CLASSES = 80
# the smallest inputs the dry run uses: SSD needs >= 268 px for its last feature map
# RetinaNet at 64 px: P6/P7 are 1x1 maps, and trainable BN over one value per channel
# (batch 1) diverges in its second step on some CPUs; at 96 px it trains
DRY_RUN_SIZE = {"ssd300": 268, "ssd512": 268, "retinanet_r50_fpn": 96}


class CheckFailed(RuntimeError):
    """A check ran but its result is wrong (non-finite loss, no finite fp16 step, ...)."""


@dataclass
class StepResult:
    name: str
    ok: bool
    images_per_step: int = 0
    input_size: str = ""
    img_per_s: float = 0.0
    peak_mem_gib: float = 0.0
    final_loss: float = float("nan")
    grad_scale: float | None = None
    amp: bool = True
    loader_img_per_s: float | None = None  # the training loader alone (None: not measured)
    loader_data: str = ""
    error: str | None = None

    @property
    def data_bound(self) -> bool | None:
        """The step would wait for the loader: it yields fewer images per second."""
        return None if self.loader_img_per_s is None else self.loader_img_per_s < self.img_per_s


@dataclass
class Report:
    device: str
    torch: str
    gpus: int
    plan: dict
    detectors: list[StepResult] = field(default_factory=list)
    training: dict = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        out = [f"{d.name}: {d.error}" for d in self.detectors if not d.ok]
        if self.training and not self.training.get("ok"):
            out.append(f"pisa train: {self.training.get('error')}")
        return out


# ---------------------------------------------------------------- 1. each detector


def _experiment(name: str) -> ExperimentConfig:
    return load_config(REPO / "configs" / DETECTORS[name])


def _model_config(name: str, dry_run: bool):
    cfg = _experiment(name)
    # random init: no download; trainable BN, as from-scratch training uses
    update: dict[str, Any] = {"pretrained_backbone": None, "norm": "bn"}
    if dry_run:
        size = DRY_RUN_SIZE.get(name, 64)
        update.update(
            min_size=size, max_size=size, rpn_pre_nms_top_n_train=60, rpn_post_nms_top_n_train=60, rois_per_image=16
        )
    return cfg.model.model_copy(update=update), cfg.train.images_per_worker


def _batch(n: int, height: int, width: int, with_masks: bool, device: torch.device, seed: int):
    """`n` uint8 noise images with 1-8 random boxes each (COCO-like counts and sizes)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8).to(device))
        k = int(torch.randint(1, 9, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
        wh = (0.05 + 0.25 * torch.rand(k, 2, generator=g)) * torch.tensor([width, height])
        boxes = torch.cat([xy, xy + wh], dim=1)
        t = {"boxes": boxes.to(device), "labels": torch.randint(1, COCO_CLASSES + 1, (k,), generator=g).to(device)}
        if with_masks:
            masks = torch.zeros(k, height, width, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                masks[i, y0:y1, x0:x1] = 1
            t["masks"] = masks.to(device)
        targets.append(t)
    return images, targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slow_cpu_bf16(device: torch.device, name: str) -> bool:
    """VGG-16 at SSD's 268+ px in bfloat16 takes minutes per step on a CPU without bf16 units
    (emulated convolutions): the dry run checks SSD in float32 there. The bf16 path of the
    SSD loss is covered by the unit tests at small sizes."""
    return device.type == "cpu" and name.startswith("ssd") and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def check_detector(
    name: str, plan: DevicePlan, device: torch.device, iters: int, warmup: int, dry_run: bool
) -> StepResult:
    """`iters` training iterations of one detector; img/s over the iterations after warm-up."""
    mcfg, per_gpu = _model_config(name, dry_run)
    n = 1 if dry_run else per_gpu
    side = fixed_input_size(mcfg)
    if side is not None:  # SSD: the loader resizes to its square input
        height, width = side, side
    else:
        height, width = mcfg.min_size, (mcfg.min_size if dry_run else mcfg.max_size * 3 // 4)
    result = StepResult(name, ok=False, images_per_step=n, input_size=f"{n}x{height}x{width}")
    try:
        torch.manual_seed(0)
        model = build_detector(mcfg, num_classes=COCO_CLASSES).to(device).train()
        if plan.channels_last:
            model = apply_channels_last(model)
        schedule = replace(TrainConfig(schedule="1x").resolved(), lr=0.01, base_batch=1, total_batch=1)
        optimizer = build_optimizer(model, schedule)
        scaler = make_grad_scaler(plan)
        images, targets = _batch(n, height, width, name.startswith("mask"), device, seed=1)
        amp = plan.amp and not _slow_cpu_bf16(device, name)
        result.amp = amp
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        start = 0.0
        for it in range(iters):
            if it == warmup:
                _sync(device)
                start = time.perf_counter()
            with torch.autocast(device.type, dtype=plan.autocast_dtype, enabled=amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise CheckFailed(
                    f"non-finite loss at iteration {it + 1}: "
                    + ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
                )
            optimizer_step(loss, model, optimizer, scaler, grad_clip=35.0)
            result.final_loss = float(loss.detach())
        _sync(device)
        elapsed = time.perf_counter() - start
        result.img_per_s = n * (iters - warmup) / max(elapsed, 1e-9)
        if scaler is not None:
            result.grad_scale = scaler.get_scale()
            if result.grad_scale < 1.0:
                raise CheckFailed(f"GradScaler scale fell to {result.grad_scale}: fp16 gradients overflow every step")
        if device.type == "cuda":
            result.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
        else:  # the process's peak resident memory (Linux: KiB)
            result.peak_mem_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        result.ok = True
    except Exception as exc:  # noqa: BLE001 - every failure is reported, then fails the check
        traceback.print_exc()
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _loader_data(data: DataConfig, work: Path) -> tuple[DataConfig, str]:
    """The config's training data if it is here; else BCCD's real 640x480 JPEGs (decoding as
    COCO's do), else generated 640 px images; the config's augmentation and workers either way."""
    here = {"train_images": REPO / str(data.train_images), "train_annotations": REPO / str(data.train_annotations)}
    if all(path.exists() for path in here.values()):
        return data.model_copy(update=here), str(data.train_images)
    keep = {"augment": data.augment, "flip_prob": data.flip_prob, "num_workers": data.num_workers}
    bccd = REPO / "datasets" / "bccd"
    if (bccd / "train.json").exists():
        paths = {f"{s}_images": bccd / "images" for s in ("train", "val")}
        paths |= {f"{s}_annotations": bccd / f"{s}.json" for s in ("train", "val")}
        return DataConfig(**paths, **keep), "BCCD 640x480"
    synthetic = {"out": work / "loader_data", "train": 64, "val": 1, "image_size": 640}
    return DataConfig(synthetic=synthetic, **keep), "synthetic 640x640"


def check_loader(name: str, result: StepResult, device: torch.device, batches: int, dry_run: bool, work: Path) -> None:
    """The training loader of `name`'s config alone, at the batch the step used: its img/s."""
    cfg = _experiment(name)
    data, result.loader_data = _loader_data(cfg.data, work)
    mcfg, _ = _model_config(name, dry_run)
    train = cfg.train.model_copy(update={"images_per_worker": result.images_per_step})
    cfg = cfg.model_copy(update={"model": mcfg, "data": data, "train": train})
    loader = build_train_loader(build_train_set(cfg), cfg, 0, 1, plan_for(cfg.train, device.type, 1))
    result.loader_img_per_s = loader_images_per_sec(loader, batches)
    result.loader_data += f", {cfg.data.num_workers} workers"


# ---------------------------------------------------------------- 2. pisa train + resume


def _train_config(work: Path, gpus: int, dry_run: bool) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / DETECTORS["faster_rcnn_r50_fpn"]).read_text())
    workers = 2 if dry_run else max(1, gpus)
    iters_per_epoch = 1 if dry_run else 3  # on CPU an R-50 iteration in emulated bf16 takes seconds
    cfg["name"] = "gpu-check"
    cfg["model"].update(pretrained_backbone=None, norm="bn")
    if dry_run:  # the same engine path; a ResNet-18 costs a fraction of an R-50 on CPU
        cfg["model"].update(
            backbone="resnet18_fpn",
            min_size=64,
            max_size=64,
            rpn_pre_nms_top_n_train=60,
            rpn_post_nms_top_n_train=60,
            rpn_pre_nms_top_n_test=50,
            rpn_post_nms_top_n_test=50,
            rois_per_image=16,
        )
    cfg["data"] = {
        "synthetic": {
            "out": str(work / "synthetic"),
            "train": workers * 2 * iters_per_epoch,
            "val": 2 if dry_run else 8,
            "image_size": 64 if dry_run else 640,
        },
        "num_workers": 2,
    }
    cfg["train"].update(
        schedule="custom",
        epochs=2,
        lr=0.02,
        milestones=[],
        warmup_iters=2,
        workers=workers,
        use_gpu=not dry_run,
        images_per_worker=2,
        amp=True,
        channels_last=True,
        log_every=1,
        keep_checkpoints=2,
    )
    cfg["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "gpu-check"}
    cfg["storage_path"] = str(work / "ray_results")
    path = work / "gpu_check_train.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _pisa_train(config: Path, run_name: str, *extra: str, timeout: float) -> tuple[dict, str]:
    """`pisa train` in a subprocess (its own Ray cluster); its summary JSON and its console."""
    cmd = [sys.executable, "-m", "pisa.cli", "train", str(config), "--run-name", run_name, *extra]
    print(f"$ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        cmd, cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    sys.stdout.write(proc.stdout)
    marker = proc.stdout.rfind('{\n  "run_id"')
    if proc.returncode != 0 or marker < 0:
        raise CheckFailed(
            f"`pisa train` exited {proc.returncode}"
            + (f": {json.loads(proc.stdout[marker:]).get('error')}" if marker >= 0 else "")
        )
    return json.loads(proc.stdout[marker:]), proc.stdout


# a resumed run against the uninterrupted one: on CPU bitwise (up to the printed digits); on a
# GPU, atomics in some backward kernels make them close only
RESUME_TOLERANCE = {
    "cpu": {"first_iter_loss": 1e-6, "train_loss": 1e-6},
    "gpu": {"first_iter_loss": 1e-3, "train_loss": 0.05},
}


def first_iteration_loss(console: str, epoch: int) -> float:
    """The loss of an epoch's first iteration, from the console's `[pisa] epoch E/N iter 1/M loss X`
    (rank 0's line; the trainings here log every iteration)."""
    m = re.search(rf"\[pisa\] epoch {epoch}/\d+ iter 1/\d+ loss (\S+)", console)
    if m is None:
        raise CheckFailed(f"no `epoch {epoch}/.. iter 1/..` line in `pisa train`'s console")
    return float(m.group(1))


def compare_resumed(full: dict[str, float], resumed: dict[str, float], on_gpu: bool) -> None:
    """Raise `CheckFailed` unless the resumed run's `first_iter_loss` and `train_loss` (epoch 2)
    are the uninterrupted run's within `RESUME_TOLERANCE` (relative)."""
    for key, tol in RESUME_TOLERANCE["gpu" if on_gpu else "cpu"].items():
        # the console prints 4 decimals: two values that close may print one unit apart
        slack = 1e-4 if key == "first_iter_loss" else 0.0
        if not math.isfinite(resumed[key]) or abs(resumed[key] - full[key]) > tol * abs(full[key]) + slack:
            raise CheckFailed(
                f"resumed {key} {resumed[key]:.6g} vs uninterrupted {full[key]:.6g}: more than {tol:.0e} apart"
                f" ({abs(resumed[key] - full[key]) / abs(full[key]):.2%})"
            )


def check_training(work: Path, gpus: int, dry_run: bool, timeout: float) -> dict:
    out: dict = {"ok": False, "workers": 2 if dry_run else max(1, gpus)}
    try:
        config = _train_config(work, gpus, dry_run)
        full, full_console = _pisa_train(config, "gpu-check-full", timeout=timeout)
        metrics = full["metrics"]
        if metrics.get("epoch") != 2 or not math.isfinite(metrics.get("train_loss", float("nan"))):
            raise CheckFailed(f"uninterrupted run ended with {metrics}")
        out["img_per_s_per_gpu"] = metrics["images_per_sec"] / out["workers"]
        out["bbox_mAP"] = metrics.get("bbox_mAP")
        checkpoints = sorted((work / "ray_results" / "gpu-check-full").glob("checkpoint_*"))
        if not checkpoints:
            raise CheckFailed("no checkpoint written")
        resumed, resumed_console = _pisa_train(
            config, "gpu-check-resumed", "--resume", str(checkpoints[0]), timeout=timeout
        )
        r = resumed["metrics"]
        if r.get("epoch") != 2:
            raise CheckFailed(f"resumed run ended at epoch {r.get('epoch')}, not 2")
        out["train_loss"], out["resumed_train_loss"] = metrics["train_loss"], r["train_loss"]
        out["first_iter_loss"] = first_iteration_loss(full_console, 2)
        out["resumed_first_iter_loss"] = first_iteration_loss(resumed_console, 2)
        compare_resumed(
            {"first_iter_loss": out["first_iter_loss"], "train_loss": out["train_loss"]},
            {"first_iter_loss": out["resumed_first_iter_loss"], "train_loss": out["resumed_train_loss"]},
            on_gpu=not dry_run,
        )
        out["ok"] = True
    except CheckFailed as exc:  # a result out of bounds: no traceback to read
        out["error"] = f"CheckFailed: {exc}".splitlines()[0]
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        out["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return out


# ---------------------------------------------------------------- reference rates


def gpu_type_of(device_name: str) -> str:
    """The table's short name of a card: "NVIDIA H200" -> h200, "NVIDIA A100-SXM4-80GB" -> a100."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device_name)
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower().removeprefix("nvidia ")).strip("-")


def git_commit(repo: Path = REPO) -> str:
    """The checkout's short commit, `+dirty` when the training step's sources differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "pisa"], cwd=repo).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


MEASURED = (
    "gpu_check training step only: random init, trainable BN, 80 classes, one synthetic batch "
    "(noise images, 1-8 random boxes each), img/s over {timed} iterations after {warmup} warm-up; "
    "no data loading, no evaluation"
)


def rate_rows(
    report: Report, *, gpu_type: str, commit: str, date: str, command: str, step_hash: str, iters: int, warmup: int
) -> list[reference_rates.RateRow]:
    """The reference-rate rows of a check's passed detectors (one GPU each, its img/s and peak memory)."""
    rows = []
    for d in report.detectors:
        if not d.ok or d.img_per_s <= 0:
            continue
        model = _experiment(d.name).model
        if not d.amp:
            precision = "fp32"
        elif "float16" in report.plan.get("amp", "") and "bfloat16" not in report.plan.get("amp", ""):
            precision = "fp16+gradscaler" if report.plan.get("grad_scaler") else "fp16"
        else:
            precision = "bf16"
        size = d.input_size.split("x", 1)[1] if "x" in d.input_size else d.input_size
        peak = d.peak_mem_gib if d.peak_mem_gib > 0 else None
        rows.append(
            reference_rates.RateRow(
                config=f"configs/{DETECTORS[d.name]}",
                detector=model.detector,
                backbone=model.backbone,
                gpu=gpu_type,
                device=report.device,
                precision=precision,
                gpus=1,
                images_per_gpu=d.images_per_step,
                input=f"{size} synthetic",
                train_img_per_s=d.img_per_s,
                eval_s_per_image=None,
                gpu_mem_peak_gib=peak,
                gpu_mem_per_image_gib=None if peak is None else peak / d.images_per_step,
                measured=MEASURED.format(timed=iters - warmup, warmup=warmup),
                torch=report.torch,
                commit=commit,
                date=date,
                command=command,
                step_hash=step_hash,
            )
        )
    return rows


# ---------------------------------------------------------------- main


def _time_loader(name: str, result: StepResult, device: torch.device, args: argparse.Namespace, work: Path) -> None:
    """`check_loader`, whose failure fails the detector: the step's data path is part of it."""
    try:
        check_loader(name, result, device, args.loader_batches, args.dry_run, work)
        print(f"   loader: {result.loader_img_per_s:.2f} img/s ({result.loader_data})", flush=True)
    except Exception as exc:  # noqa: BLE001 - reported, then fails the check
        traceback.print_exc()
        result.ok, result.error = False, f"training loader: {type(exc).__name__}: {exc}".splitlines()[0]


def print_report(report: Report) -> None:
    print(f"\n== pisa GPU check: {report.device}, torch {report.torch}, {report.gpus} GPU(s); plan {report.plan}")
    mem = "peak GiB" if report.gpus else "peak RSS GiB"
    print(
        f"{'detector':<22} {'batch/GPU':<14} {'img/s/GPU':>9} {'loader img/s':>12} {mem:>12} {'loss':>8} "
        f"{'scale':>8}  status"
    )
    for d in report.detectors:
        scale = f"{d.grad_scale:.0f}" if d.grad_scale is not None else "-"
        loader = f"{d.loader_img_per_s:12.2f}" if d.loader_img_per_s is not None else f"{'-':>12}"
        print(
            f"{d.name:<22} {d.input_size:<14} {d.img_per_s:9.2f} {loader} {d.peak_mem_gib:12.2f} "
            f"{d.final_loss:8.3f} {scale:>8}  {'ok' if d.ok else 'FAILED: ' + str(d.error)}"
        )
    for d in report.detectors:
        if d.data_bound is not None:
            verdict = "DATA-BOUND: the step waits for the loader" if d.data_bound else "not data-bound"
            print(
                f"  {d.name}: loader {d.loader_img_per_s:.2f} img/s ({d.loader_data}) vs step "
                f"{d.img_per_s:.2f} img/s: {verdict}"
            )
    t = report.training
    if t:
        status = "ok" if t.get("ok") else f"FAILED: {t.get('error')}"
        print(f"pisa train, {t['workers']} worker(s), 2 epochs + resume from epoch 1: {status}")
        if "resumed_train_loss" in t:
            nan = float("nan")
            print(
                f"  epoch 2, uninterrupted vs resumed: first iteration's loss {t.get('first_iter_loss', nan):.4f}"
                f" vs {t.get('resumed_first_iter_loss', nan):.4f}, train_loss {t['train_loss']:.6f}"
                f" vs {t['resumed_train_loss']:.6f}"
            )
        if t.get("ok"):
            print(f"  {t['img_per_s_per_gpu']:.2f} img/s per GPU (epoch 2, incl. data loading)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny inputs, 2 iterations, 2 CPU workers: the code path, not the speed"
    )
    parser.add_argument("--gpus", type=int, default=None, help="GPUs for `pisa train` (default: all)")
    parser.add_argument("--iters", type=int, default=30, help="iterations per detector")
    parser.add_argument("--warmup", type=int, default=5, help="iterations before timing starts")
    parser.add_argument("--detectors", nargs="+", choices=sorted(DETECTORS), default=list(DETECTORS))
    parser.add_argument("--skip-train", action="store_true", help="only the per-detector iterations")
    parser.add_argument(
        "--loader-batches", type=int, default=10, help="batches each training loader is timed over (0: skip)"
    )
    parser.add_argument("--train-timeout", type=float, default=420.0, help="seconds per `pisa train`")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    parser.add_argument(
        "--rates", type=Path, default=reference_rates.RATES_CSV, help="the reference-rate table rows are appended to"
    )
    parser.add_argument("--no-rates", action="store_true", help="append no reference-rate rows")
    parser.add_argument("--gpu-type", help="the rows' GPU type (default: from the card's name, e.g. h200)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device available (use --device cpu --dry-run to check the code path on CPU)")
    if args.dry_run:
        args.iters, args.warmup = min(args.iters, 2), min(args.warmup, 1)
        args.loader_batches = min(args.loader_batches, 2)
    device = torch.device(args.device)
    gpus = (args.gpus or torch.cuda.device_count()) if device.type == "cuda" else 0
    where = (
        torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    # the plan a single worker of a default config gets on this device, AMP and channels_last forced
    # on for CPU
    plan = plan_for(TrainConfig(amp=True, channels_last=True), device.type, 1)
    report = Report(
        where,
        torch.__version__,
        gpus,
        {"amp": str(plan.autocast_dtype), "grad_scaler": plan.grad_scaler, "channels_last": plan.channels_last},
    )

    with tempfile.TemporaryDirectory(prefix="pisa-gpu-check-data-") as data_tmp:
        for name in args.detectors:
            print(f"-- {name}: {args.iters} iterations", flush=True)
            result = check_detector(name, plan, device, args.iters, args.warmup, args.dry_run)
            report.detectors.append(result)
            print(
                f"   {'ok' if result.ok else 'FAILED'}: {result.img_per_s:.2f} img/s, {result.peak_mem_gib:.2f} GiB",
                flush=True,
            )
            if result.ok and args.loader_batches > 0:
                _time_loader(name, result, device, args, Path(data_tmp))
    if not args.skip_train:
        with tempfile.TemporaryDirectory(prefix="pisa-gpu-check-") as tmp:
            report.training = check_training(Path(tmp), gpus, args.dry_run, args.train_timeout)

    print_report(report)
    if device.type == "cuda" and not args.dry_run and not args.no_rates:
        rows = rate_rows(
            report,
            gpu_type=args.gpu_type or gpu_type_of(where),
            commit=git_commit(),
            date=time.strftime("%Y-%m-%d"),
            command=" ".join(["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
            step_hash=reference_rates.step_hash(),
            iters=args.iters,
            warmup=args.warmup,
        )
        print(f"appended {reference_rates.append_rows(rows, args.rates)} row(s) to {args.rates}")
    if args.out:
        args.out.write_text(json.dumps({**asdict(report), "failures": report.failures}, indent=2, default=str))
    if report.failures:
        print("\nGPU CHECK FAILED:\n  " + "\n  ".join(report.failures), file=sys.stderr)
        return 1
    print("\nGPU check passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
