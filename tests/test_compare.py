"""`pisa compare` and `pisa paper` end to end on CPU: two detectors' pairs (tiny Faster
R-CNN and RetinaNet on the generated shapes), 1 epoch, 2 seeds; the compare's driver
SIGKILLed after its second training ends and run again with the same command (it
continues); one PISA config fails (its row says so, the rest of the table stands). The
table's numbers are checked against values read from MLflow and statistics from SciPy."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import mlflow_client, tiny_experiment
from scipy import stats as sps

from pisa import tracking
from pisa.tracking import tags as tag

PISA = [sys.executable, "-m", "pisa.cli"]
SEEDS = [0, 1]


def _pair(folder: Path, data: Path, work: Path, row: str, detector: str, ref: tuple[float, float], **pisa_train):
    """A baseline and a PISA config of `row`, with reference fields as the shipped configs."""
    base = tiny_experiment(data, work, workers=1, epochs=1)
    base["model"].update(detector=detector, sampler="random", isr_p={"enabled": False}, carl={"enabled": False})
    if detector == "retinanet":
        base["model"].update(backbone="resnet18_fpn", norm="bn")
        del base["model"]["box_head_width"]  # a two-stage detector's
    pisa = json.loads(json.dumps(base))
    pisa["model"].update(isr_p={"enabled": True}, carl={"enabled": True})
    pisa["train"].update(pisa_train)
    base["reference"] = {"row": row, "source": "test", "metrics": {"bbox_mAP": ref[0]}}
    pisa["reference"] = {
        "row": row,
        "source": "test",
        "metrics": {"bbox_mAP": ref[1]},
        "baseline": f"{row}_baseline.yaml",
        "budget": "the test's",
    }
    (folder / f"{row}_baseline.yaml").write_text(yaml.safe_dump(base))
    (folder / f"{row}_pisa.yaml").write_text(yaml.safe_dump(pisa))


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        PISA + args,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_paper_table_resumes_after_a_crash_keeps_a_failed_row_and_matches_mlflow(tmp_path: Path, synthetic_dir: Path):
    configs = tmp_path / "configs"
    configs.mkdir()
    _pair(configs, synthetic_dir, tmp_path, "tiny_frcnn", "faster_rcnn", (0.364, 0.384))
    # a learning rate that makes the loss non-finite: the training fails, deterministically
    _pair(configs, synthetic_dir, tmp_path, "tiny_retina", "retinanet", (0.356, 0.369), lr=1.0e12)
    args = ["paper", "--configs", str(configs), "--seeds", "2", "--name", "table"]

    crashed = _run(args, tmp_path, PISA_DRIVER_FAULTS=json.dumps({"kill_at": "trial_complete:2"}))
    assert crashed.returncode == -9, crashed.stdout[-3000:] + crashed.stderr[-3000:]
    assert "training 2/8" in crashed.stdout

    done = _run(args, tmp_path)
    out = done.stdout
    assert done.returncode == 1, out[-3000:] + done.stderr[-3000:]  # a config failed: not all ok
    assert "continuing compare table" in out

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.tracker(uri)
    parents = tracker.find_runs("tests", f"tags.`{tag.KIND}` = 'compare'")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"  # ended, one training config failed
    runs = tracker.children("tests", parents[0].info.run_id)
    # exactly one run per config and seed: the crash neither lost nor duplicated one
    keys = sorted((r.data.tags[tag.VARIANT], r.data.tags[tag.SEED]) for r in runs)
    expected = sorted(
        (f"{row}_{kind}", str(s))
        for row in ("tiny_frcnn", "tiny_retina")
        for kind in ("baseline", "pisa")
        for s in SEEDS
    )
    assert keys == expected
    status = {(r.data.tags[tag.VARIANT], int(r.data.tags[tag.SEED])): r.info.status for r in runs}
    assert all(status[("tiny_retina_pisa", s)] == "FAILED" for s in SEEDS)
    assert sum(v == "FINISHED" for v in status.values()) == 6
    # every finished training logged its one epoch once
    client = mlflow_client(uri)
    final: dict[tuple[str, int], float] = {}
    for r in runs:
        if r.info.status == "FINISHED":
            history = client.get_metric_history(r.info.run_id, "bbox_mAP")
            assert [m.step for m in history] == [1]
            final[(r.data.tags[tag.VARIANT], int(r.data.tags[tag.SEED]))] = history[-1].value

    with open(_artifact(uri, parents[0].info.run_id, "paper/paper.csv")) as f:
        rows = {r["detector"]: r for r in csv.DictReader(f)}
    frcnn = rows["tiny_frcnn"]
    base = [final[("tiny_frcnn_baseline", s)] for s in SEEDS]
    pisa = [final[("tiny_frcnn_pisa", s)] for s in SEEDS]
    diffs = [p - b for p, b in zip(pisa, base)]
    mean = sum(diffs) / len(diffs)
    half = sps.t.ppf(0.975, len(diffs) - 1) * sps.tstd(diffs) / math.sqrt(len(diffs))
    assert float(frcnn["baseline"]) == pytest.approx(sum(base) / 2, abs=1e-9)
    assert float(frcnn["pisa"]) == pytest.approx(sum(pisa) / 2, abs=1e-9)
    assert float(frcnn["diff"]) == pytest.approx(mean, abs=1e-9)
    assert float(frcnn["diff_ci_low"]) == pytest.approx(mean - half, abs=1e-6)
    assert float(frcnn["diff_ci_high"]) == pytest.approx(mean + half, abs=1e-6)
    assert float(frcnn["reference_diff"]) == pytest.approx(0.020)
    assert frcnn["epochs"] == "1" and frcnn["images"] == "8"  # train_limit 8, one epoch
    # the failed row says so; its baseline still trained
    retina = rows["tiny_retina"]
    assert retina["verdict"] == "failed" and "non-finite" in retina["failed"].lower()
    assert float(retina["baseline"]) == pytest.approx(sum(final[("tiny_retina_baseline", s)] for s in SEEDS) / 2)
    # the printed table, and the compare's own files
    assert "tiny_frcnn" in out and "36.4 -> 38.4 (+2.0)" in out
    per_seed = json.loads(Path(_artifact(uri, parents[0].info.run_id, "compare/per_seed.json")).read_text())
    assert len(per_seed) == 8 and all("per_class_AP" in p for p in per_seed)


def _artifact(uri: str, run_id: str, path: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=uri)


def test_compare_refuses_a_name_taken_by_other_configs_before_starting(tmp_path: Path, synthetic_dir: Path, no_ray):
    from pisa.comparisons.compare import load_entries, run_compare
    from pisa.core.errors import ConfigError

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for path, k in ((a, 1.0), (b, 2.0)):
        exp = tiny_experiment(synthetic_dir, tmp_path, workers=1)
        exp["model"]["isr_p"]["k"] = k
        path.write_text(yaml.safe_dump(exp))
    root = tmp_path / "ray_results" / "taken"
    root.mkdir(parents=True)
    (root / "compare.json").write_text(
        json.dumps(
            {
                "name": "taken",
                "tracking_uri": "sqlite:///x.db",
                "experiment": "tests",
                "metric": "bbox_mAP",
                "mode": "max",
                "seeds": [0, 1],
                "labels": ["a", "c"],
                "references": [0, 0],
                "configs": [],
                "run_id": "r",
            }
        )
    )
    with pytest.raises(ConfigError, match="--name taken: an unfinished compare of other configs"):
        run_compare(
            load_entries([str(a), str(b)]), seeds=[0, 1], name="taken", storage_path=str(tmp_path / "ray_results")
        )
    with pytest.raises(ConfigError, match="at least two configs"):
        load_entries([str(a)])


def test_paper_names_the_rows_it_knows(tmp_path: Path, synthetic_dir: Path):
    from pisa.comparisons.paper import paper_entries
    from pisa.core.errors import ConfigError

    _pair(tmp_path, synthetic_dir, tmp_path, "tiny_frcnn", "faster_rcnn", (0.3, 0.4))
    with pytest.raises(ConfigError, match="unknown ssd300; the rows in .*: tiny_frcnn"):
        paper_entries(tmp_path, ["ssd300"])
    entries, pairs = paper_entries(tmp_path, None)
    assert [e.label for e in entries] == ["tiny_frcnn_baseline", "tiny_frcnn_pisa"]
    assert [e.reference for e in entries] == [0, 0] and pairs[0].row == "tiny_frcnn"


def test_the_shipped_paper_configs_pair_up_with_their_published_aps():
    from helpers import REPO

    from pisa.comparisons.paper import paper_entries

    entries, pairs = paper_entries(REPO / "configs", None)
    table = {
        p.row: (
            entries[p.baseline].config.reference.metrics.get("bbox_mAP"),
            entries[p.pisa].config.reference.metrics.get("bbox_mAP"),
        )
        for p in pairs
    }
    # mmdetection configs/pisa's README table (its Mask R-CNN X-101 PISA row is empty)
    assert table == {
        "faster_rcnn_r50": (0.364, 0.384),
        "faster_rcnn_x101": (0.401, 0.419),
        "mask_rcnn_r50": (0.373, 0.391),
        "mask_rcnn_x101": (0.411, None),
        "retinanet_r50": (0.356, 0.369),
        "retinanet_x101": (0.390, 0.407),
        "ssd300": (0.256, 0.276),
        "ssd512": (0.293, 0.318),
    }
