"""`make gpu-check` and bench_step on CPU: the GPU check's code path at tiny sizes (dry run),
and the check's verdict on a resumed training against the uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_gpu_check_dry_run_passes_on_cpu(tmp_path):
    """Every detector's step through the check's code path. Its second half, `pisa train` with
    2 workers, AMP and channels_last and a bit-exact resume from epoch 1, is what
    tests/test_train.py runs (`test_two_workers_train_on_the_gpu_code_path_and_report_coco_metrics`,
    `test_resumed_and_killed_worker_continue_exactly_as_uninterrupted`): two more `pisa train`
    processes here would only repeat them, at 2 minutes of the suite. The check's comparison of
    the two runs is tested below on given numbers."""
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--dry-run", "--skip-train", "--out", str(out)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    assert [d["name"] for d in report["detectors"]] == [
        "faster_rcnn_r50_fpn",
        "mask_rcnn_r50_fpn",
        "retinanet_r50_fpn",
        "ssd300",
        "ssd512",
    ]
    assert all(d["ok"] and d["img_per_s"] > 0 and d["peak_mem_gib"] > 0 for d in report["detectors"])
    assert report["plan"] == {"amp": "torch.bfloat16", "grad_scaler": False, "channels_last": True}
    assert not report["training"]
    assert "GPU check passed." in proc.stdout


@pytest.mark.slow
def test_gpu_check_fails_loudly(tmp_path):
    # a detector that cannot run (an SSD input too small for its feature maps) fails the check
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util, sys; sys.argv[0] = 'gpu_check'; "
            "spec = importlib.util.spec_from_file_location('gpu_check', 'benchmarks/gpu_check.py'); "
            "g = sys.modules['gpu_check'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(g); "
            "g.DRY_RUN_SIZE['ssd300'] = 64; "
            "sys.exit(g.main(['--device', 'cpu', '--dry-run', '--detectors', 'ssd300', '--skip-train']))",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1
    assert "GPU CHECK FAILED" in proc.stderr and "ssd300" in proc.stderr and "too small" in proc.stderr


@pytest.mark.slow
def test_bench_step_channels_last_and_amp_on_cpu():
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_step.py",
            "--device",
            "cpu",
            "--backbone",
            "resnet18_fpn",
            "--size",
            "64",
            "--proposals",
            "50",
            "--rois",
            "16",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--channels-last",
            "--amp",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bfloat16 autocast + channels_last" in proc.stdout
    assert "isr_p+carl+isr_n" in proc.stdout


# ---------------------------------------------------------------- resumed vs uninterrupted


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


def test_the_first_iteration_loss_is_read_from_the_epochs_first_progress_line(gpu_check):
    console = (
        "(RayTrainWorker pid=11) [pisa] epoch 1/2 iter 1/3 loss 2.5000 lr 0.01 8.0 img/s eta 0:09\n"
        "(RayTrainWorker pid=11) [pisa] epoch 2/2 iter 1/3 loss 1.2345 lr 0.02 8.1 img/s eta 0:03\n"
        "(RayTrainWorker pid=11) [pisa] epoch 2/2 iter 2/3 loss 1.1000 lr 0.02 8.2 img/s eta 0:01\n"
    )
    assert gpu_check.first_iteration_loss(console, 2) == 1.2345
    assert gpu_check.first_iteration_loss(console, 1) == 2.5
    with pytest.raises(gpu_check.CheckFailed, match="no `epoch 3/"):
        gpu_check.first_iteration_loss(console, 3)


@pytest.mark.parametrize(
    "on_gpu, first, epoch, ok",
    [
        (True, 1.2000, 0.8000, True),  # identical (as on the H200)
        (True, 1.2010, 0.8300, True),  # 0.08% and 3.75% apart: the measured GPU drift
        (True, 1.2020, 0.8000, False),  # the first resumed iteration 0.17% off: not the same state
        (True, 1.2000, 0.8480, False),  # the epoch 6% off
        (True, 1.2000, float("nan"), False),
        (False, 1.2000, 0.8000, True),
        (False, 1.2000, 0.8000 * (1 + 1e-5), False),  # on CPU a resume is bit-exact
        (False, 1.2001, 0.8000, True),  # within the console's 4 printed decimals
        (False, 1.2002, 0.8000, False),
    ],
)
def test_a_resumed_run_is_compared_with_the_uninterrupted_one(gpu_check, on_gpu, first, epoch, ok):
    full = {"first_iter_loss": 1.2, "train_loss": 0.8}
    resumed = {"first_iter_loss": first, "train_loss": epoch}
    if ok:
        gpu_check.compare_resumed(full, resumed, on_gpu=on_gpu)
    else:
        with pytest.raises(gpu_check.CheckFailed, match="resumed .* vs uninterrupted"):
            gpu_check.compare_resumed(full, resumed, on_gpu=on_gpu)
