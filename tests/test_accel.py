"""The GPU code path on CPU: precision, GradScaler, channels_last, SyncBatchNorm, collectives
and the per-epoch seeding of the data loader.

What a CPU can run runs here for real (bfloat16 autocast, fp16 autocast with a GradScaler,
channels_last, a 2-process process group whose backend map has NCCL's device rule); what
it cannot (SyncBatchNorm's forward, NCCL itself) is a pure decision tested on its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import tiny_experiment
from torch import nn

from pisa.core.config import ModelConfig, TrainConfig, parse_config
from pisa.models import build_detector
from pisa.training.device_plan import (
    apply_channels_last,
    autocast_dtype,
    convert_sync_batchnorm,
    make_grad_scaler,
    needs_grad_scaler,
    optimizer_step,
    plan_for,
    process_group_backend,
    use_sync_batchnorm,
)
from pisa.training.loaders import batch_to_device, build_train_loader, seed_loader_for_epoch

# ---------------------------------------------------------------- decisions


def test_defaults_turn_the_gpu_path_on_for_cuda_only():
    train = TrainConfig()
    gpu, cpu = plan_for(train, "cuda", 8, bf16_supported=True), plan_for(train, "cpu", 2)
    assert gpu.autocast_dtype == torch.bfloat16 and not gpu.grad_scaler  # Ampere and later
    old_gpu = plan_for(train, "cuda", 8, bf16_supported=False)
    assert old_gpu.autocast_dtype == torch.float16 and old_gpu.grad_scaler  # Volta, Turing
    assert gpu.channels_last and gpu.sync_batchnorm and gpu.pin_memory
    assert cpu.autocast_dtype is None and not cpu.grad_scaler
    assert not cpu.channels_last and not cpu.sync_batchnorm and not cpu.pin_memory
    assert not plan_for(train, "cuda", 1).sync_batchnorm  # nothing to synchronise with


def test_cudnn_autotuning_only_for_fixed_size_inputs_on_cuda():
    train = TrainConfig()
    assert plan_for(train, "cuda", 8, bf16_supported=True, fixed_size=True).cudnn_benchmark  # SSD
    assert not plan_for(train, "cuda", 8, bf16_supported=True, fixed_size=False).cudnn_benchmark  # R-CNNs
    assert not plan_for(train, "cpu", 2, fixed_size=True).cudnn_benchmark


def test_amp_on_cpu_is_bfloat16_without_a_scaler():
    cpu = plan_for(TrainConfig(amp=True, channels_last=True), "cpu", 2)
    assert cpu.autocast_dtype == torch.bfloat16 and not cpu.grad_scaler and cpu.channels_last


@pytest.mark.parametrize(
    "amp, amp_dtype, device, bf16, dtype, scaler",
    [
        ("auto", "auto", "cuda", True, torch.bfloat16, False),
        ("auto", "auto", "cuda", False, torch.float16, True),
        ("auto", "float16", "cuda", True, torch.float16, True),
        ("auto", "bfloat16", "cuda", True, torch.bfloat16, False),
        (True, "float16", "cpu", None, torch.float16, True),
        (True, "auto", "cpu", None, torch.bfloat16, False),
        (False, "float16", "cuda", True, None, False),
        ("auto", "float16", "cpu", None, None, False),
    ],
)
def test_grad_scaler_only_for_float16(amp, amp_dtype, device, bf16, dtype, scaler):
    assert autocast_dtype(amp, amp_dtype, device, bf16) == dtype
    assert needs_grad_scaler(dtype) is scaler


def test_sync_batchnorm_only_for_multi_worker_cuda():
    assert use_sync_batchnorm("cuda", 8, True)
    assert not use_sync_batchnorm("cuda", 8, False)
    assert not use_sync_batchnorm("cuda", 1, True)
    assert not use_sync_batchnorm("cpu", 2, True)  # torch's SyncBatchNorm refuses CPU tensors


def test_gpu_backend_is_nccl_for_cuda_and_gloo_for_cpu_tensors():
    from ray.train.torch.config import _is_backend_nccl

    backend = process_group_backend(use_gpu=True)
    pairs = dict(item.split(":") for item in backend.split(","))
    assert pairs == {"cpu": "gloo", "cuda": "nccl"}
    assert _is_backend_nccl(backend)  # Ray still applies its NCCL settings to it
    assert process_group_backend(use_gpu=False) == "gloo"


# ---------------------------------------------------------------- collectives


def _stand_in(backend: str) -> str:
    """The same device -> backend map with gloo standing in for NCCL, which cannot start
    without a GPU: NCCL serves CUDA tensors only, so plain 'nccl' maps cuda alone."""
    if backend == "nccl":
        return "cuda:gloo"
    return backend.replace("nccl", "gloo")


def _collectives_worker(rank: int, backends: list[str], ports: list[int], out: str) -> None:
    """One process group after another, one per backend, in the same two processes."""
    for i, (backend, port) in enumerate(zip(backends, ports)):
        _collectives_in_group(rank, backend, port, Path(out, f"{i}-{rank}.json"))


def _collectives_in_group(rank: int, backend: str, port: int, out: Path) -> None:
    import torch.distributed as dist

    from pisa.evaluation import gather_predictions
    from pisa.training.collectives import all_reduce_mean, broadcast_object
    from pisa.training.loss_tally import LossTally

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=2)
    result: dict = {}
    try:
        result["mean"] = all_reduce_mean({"loss": 1.0 + 2 * rank, "n": float(rank)})
        result["broadcast"] = broadcast_object({"bbox_mAP": 0.5} if rank == 0 else None)
        preds = [
            {
                "image_id": rank,
                "boxes": torch.ones(1, 4) * rank,
                "scores": torch.ones(1),
                "labels": torch.ones(1, dtype=torch.int64),
            }
        ]
        result["gathered_ids"] = [int(p["image_id"]) for p in gather_predictions(preds)]
        # rank 1's loss goes non-finite at step 2 (and stays so); rank 0's never does
        tally = LossTally(torch.device("cpu"))
        reads = []
        for step in range(4):
            bad = rank == 1 and step >= 2
            value = torch.tensor(float("nan") if bad else 1.0 + step)
            finite = tally.add(value * 2, {"a": value, "b": value}, step)
            assert bool(finite) is not bad
            if step % 2 == 1:  # read every 2 steps, as log_every would
                reads.append(tally.read())
        result["tally"] = [[r[0].get("loss"), r[1], r[2]] for r in reads]
        result["detail"] = tally.bad_detail() if rank == 1 else None
    except RuntimeError as exc:
        result["error"] = str(exc)
    finally:
        dist.destroy_process_group()
    out.write_text(json.dumps(result))


def _run_collectives(backends: list[str], tmp_path: Path) -> list[list[dict]]:
    """Per backend, both ranks' results: two spawned processes (torch and pisa imported once)."""
    import socket

    import torch.multiprocessing as mp

    ports = []
    for _ in backends:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    mp.spawn(_collectives_worker, args=(backends, ports, str(tmp_path)), nprocs=2, join=True)
    return [[json.loads((tmp_path / f"{i}-{r}.json").read_text()) for r in range(2)] for i in range(len(backends))]


@pytest.mark.slow
def test_engine_collectives_work_under_the_gpu_backend_device_rule(tmp_path):
    # the stand-in is faithful: a CUDA-only group refuses the engine's CPU collectives,
    # which is how plain NCCL failed at the end of epoch 1
    old, results = _run_collectives([_stand_in("nccl"), _stand_in(process_group_backend(use_gpu=True))], tmp_path)
    assert "No backend type associated with device type cpu" in old[0].get("error", "")
    for r in results:
        assert "error" not in r, r
        assert r["mean"] == {"loss": 2.0, "n": 0.5}
        assert r["broadcast"] == {"bbox_mAP": 0.5}
        assert r["gathered_ids"] == [0, 1]
    # the loss tally: the same first non-finite step on both workers, at the same read
    assert results[0]["tally"] == [[6.0, None, False], [20.0, 2, False]]
    assert results[1]["tally"][0] == [6.0, None, False] and results[1]["tally"][1][1:] == [2, True]
    assert results[1]["detail"] == "total=nan (a=nan, b=nan)"


# ---------------------------------------------------------------- one training step


def _tiny_model(seed: int = 0, **overrides) -> nn.Module:
    cfg = ModelConfig(
        **{
            "detector": "faster_rcnn",
            "backbone": "resnet18_fpn",
            "norm": "bn",
            "min_size": 64,
            "max_size": 64,
            "rpn_pre_nms_top_n_train": 60,
            "rpn_post_nms_top_n_train": 60,
            "rois_per_image": 16,
            "isr_p": {"enabled": True},
            "carl": {"enabled": True},
            **overrides,
        }
    )
    torch.manual_seed(seed)
    return build_detector(cfg, num_classes=3).train()


def _batch(n: int = 2):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(n)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0], [20.0, 18.0, 60.0, 58.0]]), "labels": torch.tensor([1, 2])}
        for _ in range(n)
    ]
    return images, targets


def _step(model, images, targets, plan, scaler=None, scale_loss: float = 1.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    torch.manual_seed(7)  # the same RoI sampling draws for every model
    with torch.autocast("cpu", dtype=plan.autocast_dtype, enabled=plan.amp):
        losses = model(images, targets)
    loss = sum(losses.values()) * scale_loss
    optimizer_step(loss, model, optimizer, scaler, grad_clip=10.0)
    return loss


def test_channels_last_training_step_on_cpu():
    plan = plan_for(TrainConfig(channels_last=True), "cpu", 1)
    assert plan.channels_last and not plan.amp
    images, targets = _batch()
    images, targets = batch_to_device(images, targets, torch.device("cpu"))
    assert all(img.dim() == 3 for img in images)

    seen = []
    reference = _tiny_model()
    model = apply_channels_last(_tiny_model())
    model.backbone.body.conv1.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    assert model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    loss = _step(model, images, targets, plan)
    ref = _step(reference, images, targets, plan)
    assert seen == [True], "the batched input reaches the backbone in channels_last"
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-4)  # a memory format, not a new model


def test_bfloat16_autocast_training_step_on_cpu():
    plan = plan_for(TrainConfig(amp=True), "cpu", 1)
    model = _tiny_model()
    dtypes = []
    model.backbone.body.layer1.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    before = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    images, targets = _batch()
    loss = _step(model, images, targets, plan, scaler=make_grad_scaler(plan))
    assert make_grad_scaler(plan) is None
    assert dtypes == [torch.bfloat16] and torch.isfinite(loss)
    after = model.roi_heads.box_predictor.cls_score.weight
    assert after.dtype == torch.float32 and not torch.equal(before, after)


def test_float16_grad_scaler_steps_and_skips_an_overflow():
    plan = plan_for(TrainConfig(amp=True, amp_dtype="float16"), "cpu", 1)
    assert isinstance(make_grad_scaler(plan), torch.amp.GradScaler)
    # a small initial scale: 2**16 overflows this model's fp16 activation gradients at once
    # (the scaler then backs off for a few steps, as it does on a GPU)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    model = _tiny_model()
    # CPUs have no fast float16 convolution backward (the backbone's took 14 s a step, the
    # RPN's 5): the scaler needs gradients, not theirs, so they are frozen (the box head trains)
    model.backbone.requires_grad_(False)
    model.rpn.requires_grad_(False)
    images, targets = _batch()
    weight = model.roi_heads.box_predictor.cls_score.weight
    before = weight.detach().clone()
    _step(model, images, targets, plan, scaler)
    assert not torch.equal(before, weight) and scaler.get_scale() == 2.0**6
    # an overflowing step is skipped and the scale backs off
    before = weight.detach().clone()
    _step(model, images, targets, plan, scaler, scale_loss=float("inf"))
    assert torch.equal(before, weight) and scaler.get_scale() == 2.0**5


def test_sync_batchnorm_conversion_keeps_checkpoints_loadable():
    model = _tiny_model()
    n_bn = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    assert n_bn > 0
    synced = convert_sync_batchnorm(_tiny_model())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert synced.state_dict().keys() == model.state_dict().keys()
    model.load_state_dict(synced.state_dict())  # evaluation and `pisa predict` build plain BN
    frozen = convert_sync_batchnorm(_tiny_model(norm="frozen_bn"))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in frozen.modules())


# ---------------------------------------------------------------- data loader seeding


class RandomDraws(torch.utils.data.Dataset):
    """Each item is its index and a random draw, like a random augmentation."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        return torch.tensor(float(i)), {"draw": torch.rand(())}


def _epoch(loader) -> list[tuple[float, float]]:
    return [(float(x), float(t["draw"])) for images, targets in loader for x, t in zip(images, targets)]


def _loader(tmp_path: Path, seed: int = 0, num_workers: int = 2, rank: int = 0):
    cfg = parse_config(tiny_experiment(tmp_path, tmp_path, seed=seed))
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_workers": num_workers})})
    return build_train_loader(RandomDraws(), cfg, rank, 2, plan_for(cfg.train, "cpu", 2))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_epoch_is_the_same_after_a_restart(tmp_path, num_workers):
    def run(loader, epochs):
        out = []
        for epoch in epochs:
            torch.manual_seed(epoch)  # the engine reseeds the process RNGs per epoch too
            seed_loader_for_epoch(loader, 0, epoch, 0)
            out.append(_epoch(loader))
        return out

    uninterrupted = run(_loader(tmp_path, num_workers=num_workers), [0, 1, 2])
    resumed = run(_loader(tmp_path, num_workers=num_workers), [2])
    assert resumed[0] == uninterrupted[2]
    assert uninterrupted[0] != uninterrupted[1]  # new order and new draws every epoch
    assert len(uninterrupted[0]) == 6  # this rank's half of the 12 items


def test_train_seed_changes_the_data_order(tmp_path):
    orders = []
    for seed in (0, 1):
        loader = _loader(tmp_path, seed=seed, num_workers=0)
        seed_loader_for_epoch(loader, seed, 0, 0)
        orders.append([x for x, _ in _epoch(loader)])
    assert sorted(orders[0]) != orders[0] or sorted(orders[1]) != orders[1]
    assert orders[0] != orders[1]
    # the two ranks split the set between them
    other = _loader(tmp_path, seed=0, num_workers=0, rank=1)
    seed_loader_for_epoch(other, 0, 0, 1)
    assert sorted(orders[0] + [x for x, _ in _epoch(other)]) == [float(i) for i in range(12)]


def test_faults_poison_exactly_the_asked_iteration_and_do_nothing_otherwise(tmp_path):
    """A test's faults (`config["faults"]`): the loss is NaN exactly at the asked global
    iteration (and each NaN noted); without a spec nothing changes."""
    import math

    from pisa.training.faults import from_config

    none = from_config(None)
    assert float(none.poisoned(torch.tensor(2.0), 3, 0)) == 2.0
    log = tmp_path / "nan.log"
    faults = from_config({"nan_at": 3, "nan_log": str(log)})
    losses = [float(faults.poisoned(torch.tensor(2.0), i, 0)) for i in range(5)]
    assert [math.isnan(v) for v in losses] == [False, False, False, True, False]
    assert losses[0] == 2.0 and log.read_text() == "rank 0\n"
    faults.at_step(0, 0, 0)  # no kill or stall asked: returns


@pytest.mark.parametrize("detector", ["faster_rcnn", "mask_rcnn"])
@pytest.mark.parametrize("with_objects", [True, False])
def test_every_parameter_gets_a_gradient_in_every_step(detector, with_objects):
    """DDP runs without `find_unused_parameters` (a pass over the graph per step): it needs
    a gradient for every trainable parameter in every step, Mask R-CNN's mask head included,
    also in a batch without a single object (no positive RoI: the mask loss is 0 x its output)."""
    model = _tiny_model(detector=detector)
    images, targets = _batch()
    for t in targets:
        if not with_objects:
            t["boxes"], t["labels"] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
        if detector == "mask_rcnn":
            masks = torch.zeros(len(t["boxes"]), 64, 64, dtype=torch.uint8)
            for m, (x0, y0, x1, y1) in zip(masks, t["boxes"].int().tolist()):
                m[y0:y1, x0:x1] = 1
            t["masks"] = masks
    losses = model(images, targets)
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_ddp_broadcasts_buffers_only_for_norms_with_running_statistics():
    from pisa.training.engine import _frozen_norms_only

    assert not _frozen_norms_only(_tiny_model(norm="bn"))
    assert _frozen_norms_only(_tiny_model(norm="frozen_bn"))
    assert _frozen_norms_only(_tiny_model(norm="gn"))


def test_a_non_finite_step_leaves_the_weights_as_they_were():
    """The fused SGD takes the step's non-finite flag on the device (no host read) and skips
    the update: the weights stay as they were until the next read stops the training."""
    from pisa.core.config import TrainConfig as _Train
    from pisa.training.engine import build_optimizer

    model = _tiny_model()
    optimizer = build_optimizer(model, _Train(lr=0.02, base_batch=2, images_per_worker=2, workers=1).resolved())
    assert all(g["fused"] for g in optimizer.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, targets = _batch()
    loss = sum(model(images, targets).values()) * float("nan")
    optimizer.found_inf = (~torch.isfinite(loss)).float()
    optimizer_step(loss, model, optimizer, None, grad_clip=None)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
