"""Study economics without training: the budget's arithmetic (what may start, when the running
trials stop), the plan's overhead term, and the bad inputs of `budget:`, `extend --add` and
`--warm-start`, each one line and exit 2 with nothing started."""

from __future__ import annotations

import pytest
from helpers import write_study

from pisa import cli
from pisa.planning.cluster_capacity import Cluster
from pisa.planning.cost_plan import make_plan
from pisa.planning.training_rate import Rate
from pisa.search.budget import _LEDGERS, BudgetLimiter, BudgetSpec, BudgetStopper, Ledger
from pisa.search.state import save_state
from pisa.search.study import load_study

CPUS = Cluster(gpus=0, cpus=16, where="a test cluster")


def _spec(plan_epoch_s: float | None = 900.0, hours: float = 5.0) -> BudgetSpec:
    # a point holds 2 GPUs, trains 4 epochs; at 900 s an epoch costs 900 x 2 / 3600 = 0.5 GPU-hours
    return BudgetSpec("sqlite:///unused.db", "tests", "parent", hours, "GPU", 2.0, 4, plan_epoch_s)


def test_a_trial_starts_only_when_the_budget_pays_it_to_max_t():
    book = Ledger(_spec())
    assert book.trial_cost() == pytest.approx(2.0)  # 4 epochs x 0.5
    assert book.can_launch()  # 5 left
    book.running.add("a")
    book.record("a", {"epoch": 1, "time_train_s": 800.0, "time_eval_s": 100.0})
    # spent 0.5; a's last 3 epochs committed: 1.5; left 5 - 0.5 - 1.5 = 3 >= 2
    assert book.spent == pytest.approx(0.5) and book.committed() == pytest.approx(1.5)
    assert book.can_launch()
    book.running.add("b")  # b committed to 4 epochs: 2.0; left 5 - 0.5 - 3.5 = 1 < 2
    assert not book.can_launch() and not book.ended()
    book.running.discard("b")  # b stopped by ASHA before an epoch: its share is free again
    assert book.can_launch()
    # a logs epoch 1 again (a resumed trial) and epoch 2: counted once each -> 1.0 spent
    book.record("a", {"epoch": 1, "time_train_s": 800.0, "time_eval_s": 100.0})
    book.record("a", {"epoch": 2, "time_train_s": 900.0, "time_eval_s": 0.0})
    assert book.spent == pytest.approx(1.0) and book.committed() == pytest.approx(1.0)
    book.running.clear()
    for trial, epoch in [("c", 1), ("c", 2), ("c", 3), ("c", 4), ("d", 1)]:
        book.record(trial, {"epoch": epoch, "time_train_s": 900.0, "time_eval_s": 0.0})
    book.running.clear()
    # 1.0 + 5 x 0.5 = 3.5 spent, 1.5 left < 2: nothing more starts, and nothing runs: the end
    assert book.spent == pytest.approx(3.5) and not book.can_launch() and book.ended()


def test_without_a_rate_one_trial_measures_it():
    book = Ledger(_spec(plan_epoch_s=None))
    assert book.trial_cost() is None and book.can_launch()
    book.running.add("a")
    assert not book.can_launch()  # a second would be priced at nothing
    book.record("a", {"epoch": 1, "time_train_s": 450.0, "time_eval_s": 0.0})
    # the measured epoch prices the rest: 4 x 450 s x 2 GPUs = 1 GPU-hour; left 5 - 0.25 - 0.75 = 4
    assert book.trial_cost() == pytest.approx(1.0) and book.can_launch()


def test_a_spent_budget_stops_running_trials_and_the_search():
    from ray.tune.search import Searcher

    spec = _spec(hours=1.0)
    _LEDGERS[spec] = book = Ledger(spec)
    try:
        stopper = BudgetStopper(spec)
        assert not stopper("a", {"epoch": 1, "time_train_s": 900.0, "time_eval_s": 0.0})  # 0.5 of 1
        assert stopper("a", {"epoch": 2, "time_train_s": 900.0, "time_eval_s": 0.0})  # 1.0: spent
        assert book.stopped == {"a"}
        assert stopper("b", {"epoch": 4, "time_train_s": 900.0, "time_eval_s": 0.0})  # at max_t: not "stopped"
        assert book.stopped == {"a"}

        class Never(Searcher):
            def suggest(self, trial_id):
                raise AssertionError("asked for a point past the budget")

        book.running.clear()
        assert BudgetLimiter(Never(metric="m", mode="max"), 2, spec).suggest("c") == Searcher.FINISHED
    finally:
        _LEDGERS.pop(spec, None)


@pytest.mark.parametrize("hours", [0, -1.5])
def test_a_budget_of_no_hours_is_one_line(tmp_path, synthetic_dir, capsys, hours):
    path = write_study(tmp_path, synthetic_dir, "broke", budget={"hours": hours})
    assert cli.main(["study", "run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}: budget.hours: Input should be greater than 0"
    assert not (tmp_path / "ray_results").exists()


def test_extend_by_nothing_is_one_line(tmp_path, capsys):
    assert cli.main(["study", "extend", "anything", "--add", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --add: 0 is not a number of trials to add (1 or more)"


def test_warm_start_from_another_search_space_names_the_fields(tmp_path, synthetic_dir, capsys):
    pilot_dir = tmp_path / "pilot"
    pilot_dir.mkdir()
    # the pilot searched carl.k instead of isr_p.bias, and isr_p.k over another range
    pilot = write_study(
        pilot_dir,
        synthetic_dir,
        "pilot",
        search_space={
            "model.isr_p.k": {"type": "uniform", "low": 0.5, "high": 2.0},
            "model.carl.k": {"type": "uniform", "low": 0.5, "high": 2.0},
        },
    )
    study = load_study(pilot)
    # the pilot's state where the new study looks for it: its storage path
    study.base["storage_path"] = str(tmp_path / "ray_results")
    from pisa.search.study import Study

    save_state(Study(study.cfg, study.base, study.source), "a-parent-run", f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = write_study(tmp_path, synthetic_dir, "seeded")
    assert cli.main(["study", "run", str(path), "--warm-start", "pilot"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {path}: --warm-start pilot: another search space; these fields differ: "
        "search_space.model.carl.k, search_space.model.isr_p.bias, search_space.model.isr_p.k"
    )
    assert not (tmp_path / "ray_results" / "seeded").exists()  # nothing started


def test_the_plan_counts_its_overhead(tmp_path, synthetic_dir):
    path = write_study(tmp_path, synthetic_dir, "overhead", num_samples=4, max_concurrent_trials=2)
    rate = Rate(images_per_sec=2.0, source="a test")  # 8 images: 4 s an epoch
    plan = make_plan(load_study(path).workload(), CPUS, images=8, rate=rate)
    # FIFO: 2 waves x 2 epochs x 4 s = 16 s; ASHA (rung at 1): 4 trials 1 epoch in 2 waves, then
    # 2 trials 1 more epoch in 1: 3 epochs in a row -> 12 s. With 13% and 24% overhead: 12 / 0.87
    # and 16 / 0.76
    assert plan.fifo.wall_s == pytest.approx(16.0) and plan.asha is not None and plan.asha.wall_s == pytest.approx(12.0)
    low, high = plan.wall_range() or (0, 0)
    assert low == pytest.approx(12 / 0.87) and high == pytest.approx(16 / 0.76)
    text = " ".join(plan.text().split())
    assert "trial start-up, checkpoints and the driver are the overhead term, 13%-24% of a study's wall" in text
    assert plan.to_dict()["wall_range_s"] == (low, high)


def test_extend_fails_the_trials_a_lost_driver_left_running_in_optuna(tmp_path):
    import optuna

    from pisa.search.optuna_storage import fail_stale_trials

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="cut", storage=url, direction="maximize")
    study.tell(study.ask(), 0.5)
    study.ask()  # the trial a killed driver was running
    assert fail_stale_trials(url, "cut") == 1
    assert [t.state.name for t in optuna.load_study(study_name="cut", storage=url).trials] == ["COMPLETE", "FAIL"]
    assert fail_stale_trials(url, "no-such-study") == 0 and fail_stale_trials(None, "cut") == 0


def test_the_plan_prices_the_validation_stage(tmp_path, synthetic_dir):
    path = write_study(
        tmp_path, synthetic_dir, "validated", num_samples=4, max_concurrent_trials=2, validation={"top": 2, "seeds": 3}
    )
    rate = Rate(images_per_sec=2.0, source="a test")  # 8 images: 4 s an epoch, 1 CPU a training
    plan = make_plan(load_study(path).workload(), CPUS, images=8, rate=rate)
    # top 2 + the paper's defaults = 3 points x 3 seeds = 9 trainings x 2 epochs = 18 training-epochs,
    # 2 at a time (as many as the search ran): 5 waves x 2 epochs x 4 s = 40 s; 18 x 4 s x 1 CPU = 72 s
    assert plan.validation is not None
    assert plan.validation.trial_epochs == 18 and plan.validation.wave_epochs == 10
    assert plan.validation.wall_s == pytest.approx(40.0)
    assert plan.validation.hours == pytest.approx(72 / 3600)
    # the search: FIFO 4 x 2 x 4 s = 32 s of CPU, ASHA's least 6 trial-epochs = 24 s
    assert plan.total_hours() == pytest.approx(((24 + 72) / 3600, (32 + 72) / 3600))
    assert "then validation <= 9 trainings" in plan.line()
    assert "then validation, <= 3 points x 3 seeds" in plan.text()


def test_the_plan_prices_a_raced_point_at_its_last_seed(tmp_path, synthetic_dir):
    path = write_study(
        tmp_path,
        synthetic_dir,
        "raced",
        num_samples=4,
        max_concurrent_trials=2,
        scheduler={"type": "fifo"},
        racing={"min_seeds": 2, "max_seeds": 4},
    )
    cpus4 = Cluster(gpus=0, cpus=4, where="4 CPUs")
    rate = Rate(images_per_sec=2.0, source="a test")  # 8 images: 4 s an epoch, 1 CPU a training
    plan = make_plan(load_study(path).workload(), cpus4, images=8, rate=rate)
    # 2 seeds side by side need 2 CPUs: 2 points at a time on 4. Each point at most: 2 epochs of
    # its first 2 seeds, then seeds 3 and 4 one after the other (4 epochs); 4 points in 2 waves:
    # 2 x (2 + 4) = 12 epochs in a row = 48 s; CPU: 4 points x 4 seeds x 2 epochs x 4 s = 128 s
    assert plan.at_once == 2 and plan.fifo.trial_epochs == 8 and plan.fifo.wave_epochs == 12
    assert plan.fifo.wall_s == pytest.approx(48.0) and plan.fifo.hours == pytest.approx(128 / 3600)
    assert "x 2-4 seeds (raced; priced at 4)" in plan.line()


def test_the_budget_keeps_the_validation_stages_share():
    # 4 epochs of 900 s, 2 GPUs a point, 1 GPU a training; 6 validation trainings x 4 x 900 s x 1
    # GPU = 6 GPU-hours kept out of 10: the search may spend 4, a trial costs 2
    spec = BudgetSpec("sqlite:///unused.db", "tests", "parent", 10.0, "GPU", 2.0, 4, 900.0, 6, 1.0)
    book = Ledger(spec)
    assert book.reserved() == pytest.approx(6.0) and book.search_hours == pytest.approx(4.0)
    book.running.add("a")
    assert book.can_launch()  # 4 - 2 committed = 2 left
    book.running.add("b")
    assert not book.can_launch()  # 4 - 4 committed: no room, though 10 - 4 would leave 6
    for epoch in range(1, 5):
        book.record("a", {"epoch": epoch, "time_train_s": 900.0, "time_eval_s": 0.0})
    assert book.spent == pytest.approx(2.0) and not book.exhausted
    for epoch in range(1, 5):
        book.record("b", {"epoch": epoch, "time_train_s": 900.0, "time_eval_s": 0.0})
    assert book.exhausted  # 4 of the search's 4 spent, the stage's 6 untouched


def test_a_validation_the_budget_cannot_pay_is_one_line_before_anything_starts(tmp_path, synthetic_dir, monkeypatch):
    from pisa.core.errors import ConfigError
    from pisa.search import tuner

    path = write_study(
        tmp_path, synthetic_dir, "short", num_samples=4, validation={"top": 1, "seeds": 3}, budget={"hours": 0.01}
    )
    study = load_study(path)
    rate = Rate(images_per_sec=2.0, source="run abc")  # 8 images: 4 s an epoch
    plan = make_plan(study.workload(), CPUS, images=8, rate=rate)
    # the stage: 2 points x 3 seeds x 2 epochs x 4 s = 48 s; a trial 2 x 4 s = 8 s: 56 s > 36 s
    with pytest.raises(ConfigError) as err:
        tuner.check_budget_room(study, plan)
    assert str(err.value) == (
        f"{path}: validation.seeds: the validation stage (~0.0133) and one search trial (~0.00222) need "
        "~0.0156 CPU-hours at the plan's rate (run abc), more than budget.hours 0.01: raise budget.hours "
        "or lower validation.seeds / validation.top"
    )
    study.cfg.budget.hours = 0.02  # 72 s: room for both
    tuner.check_budget_room(study, plan)


def test_the_validation_stage_is_compared_with_its_plan(tmp_path, synthetic_dir):
    import json

    from pisa import tracking
    from pisa.search.plan_actual import compare_validation

    path = write_study(tmp_path, synthetic_dir, "billed", num_samples=4, validation={"top": 1, "seeds": 3})
    plan = make_plan(load_study(path).workload(), CPUS, images=8, rate=Rate(images_per_sec=2.0, source="a test"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = tracking.tracker(uri)
    parent = store.start_run("tests", "study billed")
    store.log_text(parent, json.dumps(plan.to_dict(), default=str), "plan.json")
    stage = store.start_run("tests", "validation")
    # planned: 2 points x 3 seeds = 6 trainings x 2 epochs, 2 at a time: 3 waves x 2 x 4 s = 24 s.
    # Only 3 trainings ran (the best point was the paper's defaults): half of it, 12 s, with 13%
    # and 24% overhead 12 / 0.87 = 13.8 s and 12 / 0.76 = 15.8 s; 17 s is within 25% of those
    line = compare_validation(uri, parent, stage, trainings=3, wall_s=17.0)
    assert line == (
        "validation plan vs actual: 3 trainings, planned <= 6; 0:00:17 wall, planned 0:00:14-0:00:16 for 3 "
        "with the overhead, within ±25%"
    )
    logged = tracking.tracker(uri).run(stage).data.metrics
    assert logged["validation_planned_wall_s_low"] == pytest.approx(12 / 0.87)
    assert logged["validation_planned_wall_s_high"] == pytest.approx(12 / 0.76)
    assert tracking.tracker(uri).run(parent).data.tags["pisa.validation_plan_vs_actual"] == line
    # 40 s is more than 1.25 x 15.8 s
    assert compare_validation(uri, parent, stage, trainings=3, wall_s=40.0).endswith("outside ±25%")
