"""The host-sync ops of a training step stay under their ceilings (benchmarks/bench_syncs.py).

A count is deterministic, not a timing: each `.item()`, `nonzero`, `masked_select` or
`unique` in a step is a wait for the GPU there, and a change that adds one shows here. The
ceilings are the counts measured on 2026-12-02 after the fixed-size selections (bench_syncs);
lower them when a change removes syncs. What remains: torchvision's degenerate-box check (one
`.item()` per image), MultiScaleRoIAlign's per-level `where` (4 per pooling pass, and 4 more in
the reuse backward of ISR-N) and RetinaNet's variable set of positive anchors (one `nonzero`)."""

from __future__ import annotations

import pytest
from helpers import load_benchmark

CEILINGS = {
    ("faster_rcnn", "baseline"): 6,
    ("faster_rcnn", "isr_p+carl"): 6,
    ("faster_rcnn", "isr_p+carl+isr_n"): 10,
    ("retinanet", "baseline"): 3,
    ("retinanet", "isr_p+carl"): 3,
}


@pytest.mark.slow
def test_host_syncs_per_step_stay_under_their_ceilings():
    bench_syncs = load_benchmark("bench_syncs")
    counts = bench_syncs.measure(bench_syncs.parse_args(["--size", "128", "--proposals", "200", "--rois", "64"]))
    found = {(d, v): c["total"] for d, by_variant in counts.items() for v, c in by_variant.items()}
    assert set(found) == set(CEILINGS)
    over = {k: (found[k], ceiling) for k, ceiling in CEILINGS.items() if found[k] > ceiling}
    assert not over, f"more host syncs per step than before (found, ceiling): {over}"
