"""A study that ends with an answer: `validation:` trains its best point and the paper's
defaults on fresh seeds after the search and says what the paired difference says. A driver
killed in the middle of that stage is continued by `pisa study resume` without training a
finished seed again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import mlflow_client, write_study

from pisa.tracking import tags as tag

PISA = [sys.executable, "-m", "pisa.cli"]


def _pisa(tmp_path, args, kill_at: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if kill_at:
        env["PISA_DRIVER_FAULTS"] = json.dumps({"kill_at": kill_at})
    return subprocess.run(
        PISA + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
    )


@pytest.mark.slow
def test_the_validation_stage_survives_a_driver_kill_and_gives_the_answer(tmp_path, synthetic_dir):
    path = write_study(
        tmp_path,
        synthetic_dir,
        "answered",
        num_samples=2,
        scheduler={"type": "fifo"},
        # a point other than the paper's is the best one whatever the seeds say: the stage has
        # a top point to train beside the paper's defaults
        points_to_evaluate=[
            {"model.isr_p.k": 0.5, "model.isr_p.bias": 0.5},
            {"model.isr_p.k": 3.0, "model.isr_p.bias": 0.5},
        ],
        validation={"top": 1, "seeds": 2},
    )
    # the study's 2 trials complete, then the stage's first training: the driver dies there
    first = _pisa(tmp_path, ["study", "run", str(path)], kill_at="trial_complete:3")
    assert first.returncode == -9, first.stdout[-3000:] + first.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name("tests")
    # the one training whose completion the kill followed left its done mark
    stage = tmp_path / "ray_results" / "answered" / "validation"
    assert len(list((stage / "trainings").glob("*/pisa_done.json"))) == 1
    assert (stage / "validation.json").exists()

    second = _pisa(tmp_path, ["study", "resume", "answered"])
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "continuing the validation of answered" in out
    answers = [ln for ln in second.stdout.splitlines() if ln.startswith("answer: ")]
    assert len(answers) == 1 and "against the paper's defaults" in answers[0], out[-4000:]
    assert any(word in answers[0] for word in (": better", ": worse", ": no significant difference at this budget"))

    runs = client.search_runs([experiment.experiment_id], max_results=200)
    trainings = [r for r in runs if r.data.tags.get(tag.KIND) == tag.Kind.VALIDATION_TRAINING]
    pairs = [(r.data.tags[tag.VARIANT], r.data.tags[tag.SEED]) for r in trainings]
    # 2 variants (the paper's defaults, the best point) x 2 fresh seeds, each trained once:
    # one run each, finished, every epoch logged once
    assert len(pairs) == 4 and len(set(pairs)) == 4, pairs
    assert {seed for _, seed in pairs} == {"1", "2"}  # after the study's seed 0
    for r in trainings:
        assert r.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "bbox_mAP")] == [1, 2]
    validations = [r for r in runs if r.data.tags.get(tag.KIND) == tag.Kind.VALIDATION]
    assert len(validations) == 1 and validations[0].info.status == "FINISHED"

    best = _pisa(tmp_path, ["study", "best", "answered"])
    assert best.returncode == 0 and "answer (validated over fresh seeds): " in best.stdout
