"""`pisa paper` over all 8 rows of the paper's table, end to end on CPU: the shipped configs in
`configs/` (Faster R-CNN, Mask R-CNN and RetinaNet on R-50 and X-101-32x4d, SSD300, SSD512, each
PISA config beside its baseline) copied and shrunk to the generated shapes, so that the real
architectures, samplers, losses and PISA settings train: no pretrained weights (nothing can be
downloaded), small images, one training and one validation image, one epoch, one seed. The
printed table and the `paper/paper.csv` logged in MLflow list the 8 rows with a trained baseline
and PISA value each and the published references of the configs."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from pisa import tracking
from pisa.comparisons.paper import paper_entries
from pisa.tracking import tags as tag

PISA = [sys.executable, "-m", "pisa.cli"]

# row: (reference baseline, reference PISA: None where not published), bbox AP in AP points
ROWS = {
    "faster_rcnn_r50": ("36.4", "38.4"),
    "faster_rcnn_x101": ("40.1", "41.9"),
    "mask_rcnn_r50": ("37.3", "39.1"),
    "mask_rcnn_x101": ("41.1", None),
    "retinanet_r50": ("35.6", "36.9"),
    "retinanet_x101": ("39.0", "40.7"),
    "ssd300": ("25.6", "27.6"),
    "ssd512": ("29.3", "31.8"),
}
SIDE = 64  # the FPN detectors' input side
SSD_SIDE = 272  # SSD300 and SSD512 below their nominal input (pisa.models.ssd): every feature map fits from 268


def _shrunk(path: Path, data: Path, work: Path) -> dict:
    """A shipped config as it trains here: its model, sampler, PISA and loss settings, its
    schedule's learning rate, warm-up and clipping kept; the weights, the size, the data, the
    budget and the resources the CPU's."""
    cfg = yaml.safe_load(path.read_text())
    model = cfg["model"]
    model["pretrained_backbone"] = None
    side = SSD_SIDE if model["detector"] in ("ssd300", "ssd512") else SIDE
    model.update(min_size=side, max_size=side)
    if model["detector"] in ("faster_rcnn", "mask_rcnn"):
        model.update(
            rpn_pre_nms_top_n_train=100,
            rpn_post_nms_top_n_train=50,
            rpn_pre_nms_top_n_test=50,
            rpn_post_nms_top_n_test=50,
            rois_per_image=32,
        )
    cfg["data"].update(
        train_images=str(data / "train"),
        train_annotations=str(data / "train.json"),
        val_images=str(data / "val"),
        val_annotations=str(data / "val.json"),
        train_limit=1,
        val_limit=1,
        num_workers=0,
    )
    cfg["train"].update(epochs=1, milestones=[], workers=1, images_per_worker=1, use_gpu=False, amp=False, log_every=1)
    cfg["tracking"] = {
        "uri": f"sqlite:///{work / 'mlflow.db'}",
        "experiment": "tests",
        "log_checkpoint": False,
        "system_metrics_interval_s": 0,
    }
    cfg["storage_path"] = str(work / "ray_results")
    return cfg


@pytest.mark.slow
def test_paper_trains_all_eight_shipped_detector_pairs_and_lists_their_rows(tmp_path: Path, synthetic_dir: Path):
    shipped, _ = paper_entries(REPO / "configs", None)
    configs = tmp_path / "configs"
    configs.mkdir()
    for entry in shipped:
        source = Path(entry.source)
        (configs / source.name).write_text(yaml.safe_dump(_shrunk(source, synthetic_dir, tmp_path), sort_keys=False))

    done = subprocess.run(
        [*PISA, "paper", "--configs", str(configs), "--seeds", "1", "--name", "paper8"]
        + ["--storage-path", str(tmp_path / "ray_results")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=840,
    )
    out = done.stdout
    assert done.returncode == 0, out[-5000:] + done.stderr[-5000:]

    # the printed table: the 8 rows in the directory's order, each with its published references
    table = out[out.index("PISA vs baseline: final-epoch bbox_mAP") : out.index("Trained and reference numbers")]
    cells = [[c.strip() for c in line.strip("│ ").split("│")] for line in table.splitlines() if line.startswith("│")]
    printed = {c[0]: c for c in cells if c[0] in ROWS}
    assert [c[0] for c in cells if c[0] and c[0] != "detector"] == list(ROWS), table
    for row, (ref_base, ref_pisa) in ROWS.items():
        baseline, pisa, _, verdict, reference, trained = printed[row][1:7]
        assert float(baseline) >= 0 and float(pisa) >= 0, printed[row]
        assert verdict == "too few seeds"  # one seed: no interval
        if ref_pisa is None:
            assert reference == f"{ref_base} -> not published"
        else:
            diff = float(ref_pisa) - float(ref_base)
            assert reference == f"{ref_base} -> {ref_pisa} ({diff:+.1f})"
        assert trained == "1 epochs, 1 images"

    # the table logged on the compare's run: the same rows, numeric trained values
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.tracker(uri)
    parents = tracker.find_runs("tests", f"tags.`{tag.KIND}` = 'compare'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    with open(_artifact(uri, parents[0].info.run_id, "paper/paper.csv")) as f:
        logged = list(csv.DictReader(f))
    assert [r["detector"] for r in logged] == list(ROWS)
    for r in logged:
        ref_base, ref_pisa = ROWS[r["detector"]]
        for key in ("baseline", "pisa", "diff"):
            assert math.isfinite(float(r[key])), r
        assert 0 <= float(r["baseline"]) <= 1 and 0 <= float(r["pisa"]) <= 1, r
        assert float(r["diff"]) == pytest.approx(float(r["pisa"]) - float(r["baseline"]), abs=1e-9)
        assert float(r["reference_baseline"]) == pytest.approx(float(ref_base) / 100)
        if ref_pisa is None:
            assert r["reference_pisa"] == "" and r["reference_pisa_published"] == "False"
        else:
            assert float(r["reference_pisa"]) == pytest.approx(float(ref_pisa) / 100)
            assert r["reference_pisa_published"] == "True"
        assert (r["seeds"], r["epochs"], r["images"], r["failed"]) == ("1", "1", "1", "")

    # one finished training per config, each the shipped config's detector, backbone and PISA
    runs = tracker.children("tests", parents[0].info.run_id)
    assert sorted(r.data.tags[tag.VARIANT] for r in runs) == sorted(Path(e.source).stem for e in shipped)
    by_label = {Path(e.source).stem: e.config.model for e in shipped}
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags[tag.VARIANT]
        model, params = by_label[run.data.tags[tag.VARIANT]], run.data.params
        assert params["model.detector"] == model.detector and params["model.backbone"] == model.backbone
        assert params["model.sampler"] == model.sampler and params["model.norm"] == model.norm
        assert params["model.isr_p.enabled"] == str(model.isr_p.enabled)
        assert params["model.carl.enabled"] == str(model.carl.enabled)
        assert params["model.pretrained_backbone"] == "None"
        # PISA's losses ran where the config has them: their weights are logged (ISR-N's with
        # Score-HLR sampling), a baseline has none
        logged = {k for k in run.data.metrics if k.startswith("pisa_")}
        expected = set()
        if model.isr_p.enabled:
            expected.add("pisa_isr_p_weights_mean")
        if model.carl.enabled:
            expected.add("pisa_carl_weights_mean")
        if model.isr_n_enabled:
            expected.add("pisa_isr_n_weights_mean")
        assert expected <= logged and bool(logged) == bool(expected), (run.data.tags[tag.VARIANT], logged)


def _artifact(uri: str, run_id: str, path: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=uri)
