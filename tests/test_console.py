"""The study console's progress line: what it promises about the time left."""

from __future__ import annotations

import pytest
from helpers import write_study

from pisa.search.console import StudyConsole
from pisa.search.study import load_study


@pytest.mark.parametrize(("scheduler", "bound"), [("asha", "<="), ("fifo", "~")])
def test_eta_counts_the_epochs_trials_could_still_train_at_the_rate_so_far(tmp_path, synthetic_dir, scheduler, bound):
    study = load_study(
        write_study(
            tmp_path,
            synthetic_dir,
            "eta",
            num_samples=5,
            scheduler={"type": scheduler},
            experiment={"train": {"epochs": 4}},
        )
    )
    console = StudyConsole(study)
    assert console._eta(30.0, done=0) == "unknown"  # no epoch trained yet: no rate

    # 3 of 5 trials started: one finished its 4 epochs, one stopped after 2, one at epoch 2
    console.numbers = {"a": 1, "b": 2, "c": 3}
    console.epochs = {"a": 4, "b": 2, "c": 2}
    console.outcomes = {"a": "finished", "b": "stopped early"}
    # 8 epochs in 80 s: 10 s each; left: c's 2 more, and 4 for each of the 2 trials not started
    assert console._eta(80.0, done=2) == f"{bound}0:01:40"

    console.numbers.update(d=4, e=5)
    console.epochs.update(c=4, d=4, e=1)
    console.outcomes.update(c="finished", d="failed")
    # 15 epochs in 150 s; only e has epochs left (3)
    assert console._eta(150.0, done=4) == f"{bound}0:00:30"
    console.outcomes["e"] = "finished"
    assert console._eta(160.0, done=5) == "0:00:00"


def test_ranking_shows_searched_values_as_their_distributions_read_them():
    from pydantic import TypeAdapter

    from pisa.search.report import format_ranking
    from pisa.search.results import StudyOutcome, TrialSummary
    from pisa.search.schema import Distribution

    logged = {"model.isr_p.k": "1.8732563742634", "train.epochs": "3", "model.sampler": "1.5"}
    trial = TrialSummary("run", "t1", "t1", "finished", 0.5, 3, params=logged)
    outcome = StudyOutcome("s", "parent", "sqlite:///x.db", [trial])

    # without the study's definition: the text MLflow holds, not a guess at its type
    row = format_ranking(outcome, "bbox_mAP").splitlines()[-2]
    assert "1.8732563742634" in row and "| 1.5 " in row.replace("│", "|")

    read = TypeAdapter(Distribution).validate_python
    outcome.search_space = {
        "model.isr_p.k": read({"type": "uniform", "low": 0.5, "high": 3.0}),
        "train.epochs": read({"type": "int", "low": 1, "high": 4}),
        "model.sampler": read({"type": "choice", "values": ["random", "1.5"]}),  # a string that looks like a float
    }
    cells = [c.strip() for c in format_ranking(outcome, "bbox_mAP").splitlines()[-2].split("│")]
    assert "1.873" in cells and "3" in cells and "1.5" in cells


def test_a_resumed_study_numbers_its_trials_as_the_run_before(tmp_path, synthetic_dir, capsys):
    """Tune's list holds a resumed study's trials in the order they were created: a new driver
    that starts the third one first calls it trial 3, as the driver before it did."""
    from types import SimpleNamespace

    study = load_study(write_study(tmp_path, synthetic_dir, "numbers", num_samples=4))
    trials = [SimpleNamespace(trial_id=i, config={"model.isr_p.k": 1.0 + n}) for n, i in enumerate("abc")]
    console = StudyConsole(study)
    console.on_trial_start(0, trials, trials[2])
    console.on_trial_start(0, trials, trials[0])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[pisa] trial 3/4 started: isr_p.k=3", "[pisa] trial 1/4 started: isr_p.k=1"]
    # a trial the list does not hold: after the highest number given
    console.on_trial_start(0, trials, SimpleNamespace(trial_id="d", config={"model.isr_p.k": 0.5}))
    assert capsys.readouterr().out.splitlines() == ["[pisa] trial 4/4 started: isr_p.k=0.5"]
