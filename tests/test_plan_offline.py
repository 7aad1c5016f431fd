"""`pisa study plan` before renting: without the images, without the annotation files, without a
GPU. The training set's size from the annotations alone (or a standard set's known size, or
`--images`), a reference rate from `benchmarks/data/rates.csv` with its provenance and
staleness, the bill in USD, and `gpu_check`'s rows appended from synthetic readings. The
expected figures are worked out by hand in each test."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pisa import cli
from pisa.core.config import DataConfig
from pisa.core.errors import ConfigError
from pisa.planning import reference_rates
from pisa.planning.dataset_size import training_set_size, val_set_size
from pisa.planning.reference_rates import RateRow, append_rows, rate_from_table, read_rows, step_hash
from pisa.search.study import load_study

REPO = Path(__file__).resolve().parents[1]
COCO_STUDY = REPO / "studies" / "faster_rcnn_r50_coco.yaml"


def _coco(path: Path, images: int, annotated: list[int], crowd_only: list[int] = ()) -> Path:
    """A COCO file of `images` images (ids 1..N, none on disk), a box on each of `annotated`,
    a crowd box alone on each of `crowd_only`."""
    anns = [
        {"id": i, "image_id": img, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25}
        for i, img in enumerate(annotated, 1)
    ]
    anns += [
        {"id": 100 + i, "image_id": img, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1}
        for i, img in enumerate(crowd_only)
    ]
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 32, "height": 32} for i in range(1, images + 1)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing"}],
    }
    path.write_text(json.dumps(data))
    return path


def _data(tmp_path: Path, train: Path, val: Path, **extra) -> DataConfig:
    # image directories that do not exist: the plan must not need them
    return DataConfig(
        train_images=tmp_path / "no-train-images",
        train_annotations=train,
        val_images=tmp_path / "no-val-images",
        val_annotations=val,
        **extra,
    )


# ---------------------------------------------------------------- the training set's size


def test_sizes_from_the_annotation_files_alone(tmp_path):
    # 7 train images: 1, 2, 4 with a box, 6 with a crowd box only, 3, 5 and 7 with nothing
    train = _coco(tmp_path / "train.json", 7, annotated=[1, 2, 4, 4], crowd_only=[6])
    val = _coco(tmp_path / "val.json", 5, annotated=[1])
    data = _data(tmp_path, train, val)
    assert data.skip_empty_train  # the default: images without annotations are left out
    size = training_set_size(data)
    assert size.images == 4  # 1, 2, 4, 6: a crowd annotation counts, as mmdetection's filter_empty_gt
    assert "4 of 7 images" in size.source and "skip_empty_train" in size.source
    assert training_set_size(_data(tmp_path, train, val, skip_empty_train=False)).images == 7
    assert training_set_size(_data(tmp_path, train, val, train_limit=3)).images == 3
    assert val_set_size(data).images == 5  # validation keeps every image
    assert val_set_size(_data(tmp_path, train, val, val_limit=2)).images == 2
    assert training_set_size(data, images=50).images == 50  # --images wins over the file
    assert training_set_size(_data(tmp_path, train, val, train_limit=3), images=50).images == 3


def test_standard_sets_are_known_without_their_files(tmp_path):
    ann = tmp_path / "coco" / "annotations"  # not created
    data = _data(tmp_path, ann / "instances_train2017.json", ann / "instances_val2017.json")
    size = training_set_size(data)
    assert size.images == 117_266 and "of 118287 images of COCO 2017 train" in size.source
    assert (
        training_set_size(_data(tmp_path, data.train_annotations, data.val_annotations, skip_empty_train=False)).images
        == 118_287
    )
    assert val_set_size(data).images == 5_000
    other = _data(tmp_path, tmp_path / "mine.json", tmp_path / "mine_val.json")
    with pytest.raises(ConfigError, match=r"mine\.json: annotation file not found.*--images N"):
        training_set_size(other)
    assert training_set_size(other, images=1234).images == 1234
    assert val_set_size(other) is None


# ---------------------------------------------------------------- the reference table


def _row(**update) -> RateRow:
    values = dict(
        config="configs/faster_rcnn_r50_fpn_1x_pisa.yaml",
        detector="faster_rcnn",
        backbone="resnet50_fpn",
        gpu="h200",
        device="NVIDIA H200",
        precision="fp32",
        gpus=1,
        images_per_gpu=2,
        input="800x999 synthetic",
        train_img_per_s=25.0,
        eval_s_per_image=None,
        gpu_mem_peak_gib=2.5,
        gpu_mem_per_image_gib=1.25,
        measured="a test row",
        torch="2.11.0",
        commit="abc1234",
        date="2026-12-01",
        command="python benchmarks/gpu_check.py",
        step_hash="000000000000",
    )
    values.update(update)
    return RateRow(**values)


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A reference table of two H200 measurements of Faster R-CNN (the later one counts) and an
    SSD300 one on an A100, in place of the repository's."""
    path = tmp_path / "rates.csv"
    append_rows([_row(train_img_per_s=10.0, commit="0ld0ld0"), _row()], path)
    append_rows([_row(detector="ssd300", backbone="vgg16", gpu="a100", device="NVIDIA A100")], path)
    monkeypatch.setattr(reference_rates, "RATES_CSV", path)
    return path


def _coco_study(tmp_path: Path, *extra: str):
    """The shipped COCO study, its data absent, its store empty, `pack: auto` off (a GPU here would probe)."""
    overrides = [
        f"data.train_annotations={tmp_path / 'absent' / 'instances_train2017.json'}",
        f"data.val_annotations={tmp_path / 'absent' / 'instances_val2017.json'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "resources_per_trial.pack=null",
        "train.amp=false",  # fp32, as the test rows (and the shipped config today)
        *extra,
    ]
    return overrides, load_study(COCO_STUDY, overrides)


def test_rate_from_the_table_latest_row_scaled_and_marked_stale(tmp_path, table):
    _, study = _coco_study(tmp_path)
    work = study.workload()
    rows = read_rows()
    assert [r.train_img_per_s for r in rows] == [10.0, 25.0, 25.0]
    rate, note, notes = rate_from_table(work, "h200", rows, installed_hash="ffffffffffff")
    assert note == "" and rate is not None
    assert rate.images_per_sec == pytest.approx(8 * 25.0)  # 8 workers, one GPU each, the later row
    assert rate.eval_s is None and "(commit abc1234, 2026-12-01)" in rate.source
    assert any("stale reference rate" in n and "ffffffffffff" in n and "000000000000" in n for n in notes)
    assert any("no evaluation time" in n for n in notes)
    assert not any("trains in" in n for n in notes)  # fp32 both
    _, fresh, _ = rate_from_table(work, "h200", rows, installed_hash="000000000000")
    rate, note, notes = rate_from_table(
        work, "h200", [*rows, _row(eval_s_per_image=0.05)], installed_hash="000000000000"
    )
    assert not any("stale" in n for n in notes)
    # evaluation sharded over 8 workers: ceil(5000 / 8) = 625 images each at 0.05 s
    assert rate is not None and rate.eval_s == pytest.approx(625 * 0.05)
    rate, note, _ = rate_from_table(work, "a100", rows)
    assert rate is None and "no faster_rcnn resnet50_fpn row for a100" in note and "ssd300 vgg16" in note


def test_plan_prices_the_coco_study_without_data_or_gpu(tmp_path, table, capsys, no_ray):
    overrides, _ = _coco_study(tmp_path)
    sets = [x for o in overrides for x in ("--set", o)]
    args = ["study", "plan", str(COCO_STUDY), *sets, "--gpus", "8", "--gpu-type", "H200", "--price", "4"]
    assert cli.main([*args, "--images", "10000"]) == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())
    # 10000 images over 8 workers: 1250 each, 625 steps of 2; 8 x 25 = 200 img/s: 50 s an epoch
    assert "10000 images, 625 iterations per worker; 12 epochs; ASHA rungs at epochs 4, 8" in text
    assert "images --images 10000" in text
    assert "200 img/s per trial" in text and "(commit abc1234, 2026-12-01)" in text
    assert "~50 s per trial (evaluation not included)" in text
    rows = {line.split()[0] + line.split()[1]: line.split()[-5:] for line in out.splitlines() if "ASHA" in line[:12]}
    # FIFO: 24 trials x 12 epochs = 288 trial-epochs, one trial at a time: 288 in a row;
    # 288 x 50 s x 8 GPUs = 32 GPU-hours, $128 at $4; wall 288 x 50 s = 4:00
    assert rows["ASHA,upper"] == ["288", "288", "~32", "~4:00", "~$128"]
    # ASHA (grace 4, factor 2, 12 epochs): 24 x 4 + 12 x 4 + 6 x 4 = 168 trial-epochs;
    # 168 x 50 x 8 / 3600 = 18.67 GPU-hours, $74.7; wall 168 x 50 s = 8400 s = 2:20
    assert rows["ASHAlower"] == ["168", "168", "~19", "~2:20", "~$74.7"]
    assert "USD at 4/GPU-hour" in out
    assert "note: stale reference rate" in out

    # no --images: COCO 2017 train's known size, the annotated images
    assert cli.main(args) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "117266 images, 7330 iterations per worker" in text  # ceil(ceil(117266 / 8) / 2)
    assert "117266 of 118287 images of COCO 2017 train: those with annotations" in text


def test_plan_line_carries_the_price(tmp_path, table):
    from pisa.planning.cost_plan import plan_study

    _, study = _coco_study(tmp_path)
    plan = plan_study(study.workload(), gpus=8, images=10000, gpu_type="h200", price=2.5)
    # 32 and 18.67 GPU-hours (as above) at $2.5: $80 and $46.7
    assert plan.fifo.usd == pytest.approx(80.0) and plan.asha.usd == pytest.approx(168 * 50 * 8 / 3600 * 2.5)
    assert "~32 GPU-hours (~$80)" in plan.line() and "(~$46.7-$80)" in plan.line()
    assert json.loads(json.dumps(plan.to_dict(), default=str))["fifo"]["usd"] == pytest.approx(80.0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gpu-type", "a9000"], "error: --gpu-type a9000: no reference rates for it; known GPU types: a100, h200"),
        (["--images", "0"], "error: --images: 0 is not a number of training images"),
        (["--price", "-1"], "error: --price: -1 is not a price in USD per GPU-hour"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_started(tmp_path, table, capsys, no_ray, monkeypatch, flags, message):
    import pisa.search.study as study_module

    monkeypatch.setattr(study_module, "load_study", lambda *a, **k: pytest.fail("the study was read"))
    assert cli.main(["study", "plan", str(COCO_STUDY), "--gpus", "8", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == message


def test_unknown_training_set_asks_for_images(tmp_path, capsys, no_ray):
    args = ["study", "plan", str(COCO_STUDY), "--gpus", "8", "--set", f"data.train_annotations={tmp_path / 'x.json'}"]
    args += ["--set", "resources_per_trial.pack=null", "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.json: annotation file not found" in err[0] and "--images N" in err[0]
    assert cli.main([*args, "--images", "64"]) == 0
    assert "64 images, 4 iterations per worker" in " ".join(capsys.readouterr().out.split())  # 8 each, 2 per step


# ---------------------------------------------------------------- the repository's table


def test_repository_table_holds_measured_rows_of_shipped_configs():
    from pisa.core.config import load_config

    rows = read_rows(reference_rates.RATES_CSV)
    assert rows, "benchmarks/data/rates.csv is empty"
    for row in rows:
        model = load_config(REPO / row.config).model
        assert (row.detector, row.backbone) == (model.detector, model.backbone), row.config
        assert row.commit and row.date and row.command.startswith("python benchmarks/") and len(row.step_hash) == 12
        assert row.train_img_per_s > 0 and row.gpus >= 1 and row.images_per_gpu >= 1
    # the H200 gpu_check runs of benchmarks/RESULTS.md (2026-11-26): no evaluation time measured
    h200 = {(r.commit, r.detector): r for r in rows if r.gpu == "h200"}
    assert h200[("bc2859d", "faster_rcnn")].train_img_per_s == 35.0
    assert h200[("4524f9e", "faster_rcnn")].gpu_mem_peak_gib == 2.63
    assert all(r.eval_s_per_image is None for r in h200.values())
    assert len(step_hash()) == 12


# ---------------------------------------------------------------- gpu_check appends rows


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_rates", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_check_appends_rows_from_its_readings(tmp_path, monkeypatch):
    g = _gpu_check()
    assert [g.gpu_type_of(n) for n in ("NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3")] == [
        "h200",
        "a100",
        "h100",
    ]
    report = g.Report("NVIDIA H200", "2.11.0+cu130", 1, {"amp": "torch.bfloat16", "grad_scaler": False})
    report.detectors = [
        g.StepResult(
            "faster_rcnn_r50_fpn", ok=True, images_per_step=2, input_size="2x800x999", img_per_s=40.0, peak_mem_gib=3.0
        ),
        g.StepResult(
            "ssd300", ok=True, images_per_step=8, input_size="8x300x300", img_per_s=300.0, peak_mem_gib=1.6, amp=False
        ),
        g.StepResult("retinanet_r50_fpn", ok=False, error="boom"),  # a failed detector gives no row
    ]
    rows = g.rate_rows(
        report,
        gpu_type="h200",
        commit="feed123",
        date="2026-12-07",
        command="python benchmarks/gpu_check.py",
        step_hash=step_hash(),
        iters=20,
        warmup=5,
    )
    path = tmp_path / "rates.csv"
    append_rows(rows[:1], path)
    append_rows(rows[1:], path)  # the header once
    assert path.read_text().count("config,detector") == 1
    back = read_rows(path)
    assert [(r.detector, r.backbone, r.precision, r.train_img_per_s) for r in back] == [
        ("faster_rcnn", "resnet50_fpn", "bf16", 40.0),
        ("ssd300", "vgg16", "fp32", 300.0),
    ]
    assert back[0].gpu_mem_per_image_gib == pytest.approx(1.5) and back[0].input == "800x999 synthetic"
    assert back[0].eval_s_per_image is None and "after 5 warm-up" in back[0].measured
    # a fresh row is not stale, and the plan finds it
    monkeypatch.setattr(reference_rates, "RATES_CSV", path)
    _, study = _coco_study(tmp_path)
    rate, _, notes = rate_from_table(study.workload(), "h200", read_rows())
    assert rate is not None and rate.images_per_sec == pytest.approx(8 * 40.0)
    assert "(commit feed123, 2026-12-07)" in rate.source and not any("stale" in n for n in notes)
    assert any("measured in bf16, this study trains in fp32" in n for n in notes)


def test_missing_data_stays_an_error_for_study_run(tmp_path, capsys, no_ray):
    overrides, _ = _coco_study(tmp_path, f"storage_path={tmp_path / 'ray_results'}")
    args = ["study", "run", str(COCO_STUDY), *[x for o in overrides for x in ("--set", o)]]
    assert cli.main(args) == 2  # before Ray starts
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "instances_train2017.json: annotation file not found" in err[0]
