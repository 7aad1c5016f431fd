"""`make gpu-check` and bench_step on CPU: the GPU check's code path at tiny sizes (dry run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_passes_on_cpu(tmp_path):
    """Every detector's step through the check's code path. Its second half, `pisa train` with
    2 workers, AMP and channels_last and a bit-exact resume from epoch 1, is what
    tests/test_train.py runs (`test_pisa_train_runs_the_gpu_code_path_on_cpu`,
    `test_resume_from_epoch_one_matches_uninterrupted`): two more `pisa train` processes
    here would only repeat them, at 2 minutes of the suite."""
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
