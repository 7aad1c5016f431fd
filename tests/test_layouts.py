"""One global batch, three layouts: 1 worker x 4 images, 2 x 2 and 4 x 1 are the same optimisation.

This is what lets a study pack trials onto fewer GPUs (`resources_per_trial: {pack: ...}`)
and keep the paper's recipe: with frozen BN (no statistics over a worker's images), the same
seed and the same total batch, the training's losses do not depend on how the batch is split.
It holds because the data order depends on (seed, epoch) only (DistributedSampler), each image's
augmentation and anchor/RoI draws on (seed, epoch, image) only (`pisa.data.draws`), and every
image contributes a fixed number of samples (so a worker's mean loss, averaged over workers by
DDP, is the global batch's mean). Each layout runs the engine's own loop (`run_worker`) in
real processes with DDP over gloo, as Ray Train sets it up (benchmarks/bench_layouts.py).
PISA's layouts are close, not equal (its weights are normalised over a worker's images): held
within a bound from the measured gap, far below another seed's distance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import load_benchmark

bench_layouts = load_benchmark("bench_layouts")

# two epochs of 5 steps: the second epoch's data order and draws cross an epoch boundary
# (DistributedSampler.set_epoch, PerImageDraws.set_epoch); benchmarks/bench_layouts.py runs 20
STEPS = 10


# The largest relative gap to 1x4 each variant may show, at the first step and over the
# STEPS steps. The baseline: the first step differs by fp32 summation order only (~1e-7
# relative per op); SGD steps of a from-scratch detector amplify it (measured on 2 CPUs over
# 20 steps: <= 2e-7 for 17 steps, then up to 1.1e-4 for 4x1); 1e-3 is 10x the worst of 20
# steps. PISA: ISR-P and CARL normalise their weights over a worker's images, so a split batch
# is not the same step. `benchmarks/bench_layouts.py [--pisa] --steps 10` on the tests' small
# detector (64-channel FPN, 128-wide box head; 2-core Intel Xeon, 2026-12-06): baseline 1.3e-7
# at step 1 and over all steps, both layouts; PISA at step 1 2.3e-4 (2x2) and 2.9e-4 (4x1),
# over all 10 steps 4.3e-2 and 5.6e-2 (with torchvision's widths, on an AMD EPYC: 4.4e-6 and
# 1.8e-4, 1.2e-2 and 3.0e-2). 1e-3 and 0.15 hold PISA to that scale, with room for another
# CPU's summation order; both far below a real difference: seed 1 against seed 0 differs by
# 6e-3 (baseline) and 4.5e-2 (PISA) at step 1 and by 0.25 and 0.31 at some step.
BOUNDS = {"baseline": (1e-5, 1e-3), "pisa": (1e-3, 0.15)}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(BOUNDS))
def test_layouts_of_one_global_batch_train_alike(synthetic_dir: Path, tmp_path: Path, variant: str) -> None:
    runs = {
        name: bench_layouts.experiment(synthetic_dir, tmp_path, workers, images, steps=STEPS, pisa=variant == "pisa")
        for name, (workers, images) in bench_layouts.LAYOUTS.items()
    }
    losses = bench_layouts.layout_losses(runs, tmp_path)
    assert all(loss.shape == (STEPS,) and loss.isfinite().all() for loss in losses.values())
    gaps = bench_layouts.relative_gaps(losses, "1x4")
    assert set(gaps) == {"2x2", "4x1"}
    first_step, every_step = BOUNDS[variant]
    for name, gap in gaps.items():
        assert gap["first_step"] < first_step, (name, gap)
        assert gap["max"] < every_step, (name, gap, losses[name], losses["1x4"])
