"""The training schedule: warm-up and LR steps by iteration, and the LR scaled linearly
from the config's base batch to the real total batch."""

from __future__ import annotations

import pytest

from pisa.core.config import TrainConfig, parse_config
from pisa.core.schedule import lr_factor


def test_lr_schedule_warmup_and_steps():
    sched = TrainConfig(milestones=[8, 11], warmup_iters=500, warmup_ratio=0.001).resolved()
    assert lr_factor(0, 100, sched) == pytest.approx(0.001)
    assert lr_factor(250, 100, sched) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(799, 100, sched) == 1.0
    assert lr_factor(800, 100, sched) == pytest.approx(0.1)
    assert lr_factor(1100, 100, sched) == pytest.approx(0.01)


def test_linear_lr_scaling():
    cfg = parse_config({"data": {"synthetic": {"out": "x"}}, "train": {"workers": 4, "images_per_worker": 2}})
    r = cfg.train.resolved()
    assert r.epochs == 12 and r.milestones == (8, 11)
    assert r.scaled_lr == pytest.approx(0.02 * 8 / 16)
    ssd = parse_config({"data": {"synthetic": {"out": "x"}}, "train": {"schedule": "ssd", "images_per_worker": 8}})
    # mmdetection's SSD lr (2e-3 at 64 images), not the supplement's 1e-3
    assert ssd.train.resolved().scaled_lr == pytest.approx(2e-3) and ssd.train.resolved().epochs == 120
