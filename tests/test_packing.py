"""`resources_per_trial.pack: auto`: a trial's batch on the fewest GPUs that hold it. The
expected layouts are worked out by hand in each test (memory = overhead + images x GiB per
image, against 90% of the card), not with the module's formulas. No Ray, no GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_study

from pisa import cli
from pisa.core.config import ModelConfig
from pisa.core.errors import ConfigError
from pisa.planning.cluster_capacity import assumed_cluster
from pisa.planning.cost_plan import make_plan
from pisa.planning.packing import GpuMemory, Layout, effective_norm, layout_free_norm, pack
from pisa.planning.training_rate import Rate
from pisa.search.study import Study, load_study
from pisa.training import probe
from pisa.trials.capacity import footprint

PAPER = Layout(workers=8, images_per_worker=2, gpus_per_worker=1)


def _memory(card: float, per_image: float, overhead: float = 2.0) -> GpuMemory:
    return GpuMemory(card_gib=card, per_image_gib=per_image, overhead_gib=overhead, source="test")


# ---------------------------------------------------------------- the arithmetic


def test_a_big_card_holds_the_whole_batch():
    # 1 GPU: 2 + 16 x 3 = 50 GiB <= 0.9 x 141 = 126.9 GiB; 8 such trials on the paper's 8 GPUs
    packing = pack(PAPER, _memory(141, 3), why_equivalent="frozen BN keeps no batch statistics")
    assert (packing.chosen.workers, packing.chosen.images_per_worker, packing.chosen.gpus) == (1, 16, 1)
    assert packing.packed and packing.trials_per_node == 8 and packing.chosen.batch == 16
    assert "16 images per worker need ~50 GiB" in packing.reason and "frozen BN" in packing.reason
    line = packing.line()
    assert line.startswith("trial layout 1 worker(s) x 16 images on 1 GPU(s) instead of 8 worker(s) x 2 images")
    assert "(8 trials on those 8 GPUs)" in line and "\n" not in line


def test_an_80_gib_card_takes_two_gpus_per_trial():
    # 1 GPU: 2 + 96 = 98 > 72 GiB usable; 2 GPUs: 2 + 8 x 6 = 50 <= 72
    packing = pack(PAPER, _memory(80, 6))
    assert (packing.chosen.workers, packing.chosen.images_per_worker) == (2, 8)
    assert packing.trials_per_node == 4


def test_four_gpus_when_two_do_not_fit():
    # usable 0.9 x 24 = 21.6: 8 images need 2 + 32 = 34 (no), 4 images 2 + 16 = 18 (yes)
    packing = pack(PAPER, _memory(24, 4))
    assert (packing.chosen.workers, packing.chosen.images_per_worker, packing.trials_per_node) == (4, 4, 2)


def test_a_node_of_other_size_counts_its_own_trials():
    assert pack(PAPER, _memory(141, 3), node_gpus=4).trials_per_node == 4


def test_fractional_gpus_plan_for_their_share_of_the_card():
    # two workers share each 80 GiB card: 36 GiB usable per worker; 4 images need 2 + 24 = 26,
    # 8 images 2 + 48 = 50 (no). The given 8 x 0.5 hold 4 GPUs; the packed 4 x 0.5 hold 2.
    given = Layout(workers=8, images_per_worker=2, gpus_per_worker=0.5)
    packing = pack(given, _memory(80, 6))
    assert (packing.chosen.workers, packing.chosen.images_per_worker, packing.chosen.gpus) == (4, 4, 2)
    assert packing.trials_per_node == 2


def test_a_card_too_small_keeps_the_given_layout():
    # even 2 images: 2 + 12 = 14 GiB > 0.9 x 12 = 10.8
    packing = pack(PAPER, _memory(12, 6))
    assert not packing.packed and packing.chosen == PAPER and packing.trials_per_node == 1
    assert "even 2 images per worker need ~14 GiB" in packing.reason and "10.8 of 12 GiB" in packing.reason
    assert packing.line().startswith("trial layout 8 worker(s) x 2 images on 8 GPU(s) kept: ")


def test_a_card_that_holds_only_the_given_layout_says_why_not_fewer():
    # 2 images: 2 + 12 = 14 <= 14.4 (0.9 x 16); 4 images: 2 + 24 = 26 > 14.4
    packing = pack(PAPER, _memory(16, 6))
    assert not packing.packed and "4 images per worker would need ~26 GiB" in packing.reason


def test_the_per_worker_losses_are_named():
    packing = pack(PAPER, _memory(141, 3), per_worker=["ISR-P", "CARL"])
    assert "ISR-P and CARL normalise over a worker's 16 images instead of 2" in packing.reason


# ---------------------------------------------------------------- which models may be packed


@pytest.mark.parametrize(
    "model, sync_bn, free",
    [
        ({"norm": "frozen_bn"}, False, True),
        ({"norm": "auto", "pretrained_backbone": "ResNet50_Weights.IMAGENET1K_V1"}, False, True),
        ({"norm": "gn"}, False, True),  # per image
        ({"norm": "bn"}, True, True),  # synchronised over the workers: the whole batch either way
        ({"norm": "bn"}, False, False),
        ({"norm": "auto"}, False, False),  # from scratch: trainable BN
        ({"detector": "ssd300", "backbone": "vgg16", "norm": "bn"}, False, True),  # VGG16 has no norm layers
    ],
)
def test_only_a_split_independent_normalisation_is_packed(model, sync_bn, free):
    equivalent, why = layout_free_norm(ModelConfig(**model), sync_bn)
    assert equivalent is free
    if not free:
        assert "trainable BN" in why and "each worker's images" in why


def test_effective_norm_is_the_backbone_builders():
    from pisa.models.backbones import resolve_norm

    for norm in ("auto", "frozen_bn", "bn", "gn"):
        for weights in (None, "ResNet50_Weights.IMAGENET1K_V1"):
            model = ModelConfig(norm=norm, pretrained_backbone=weights)
            assert effective_norm(model) == resolve_norm(model)


# ---------------------------------------------------------------- loading a study


def _study(tmp_path: Path, data_dir: Path, resources: dict, overrides: list[str] | None = None, **spec) -> Study:
    return load_study(write_study(tmp_path, data_dir, "pack", resources_per_trial=resources, **spec), overrides)


FROZEN = ["model.norm=frozen_bn"]
H200 = {"pack": "auto", "gpu_mem_per_image_gib": 3, "gpu_mem_gib": 141}


def test_a_packed_study_trains_the_same_batch_and_lr_on_one_gpu(tmp_path, synthetic_dir):
    # given 4 workers x 2 images: batch 8, lr 0.02 at base_batch 16 -> 0.01; 2 + 8 x 3 GiB fit one card
    given = _study(tmp_path, synthetic_dir, {"workers": 4, "gpus_per_worker": 1}, FROZEN, max_concurrent_trials=2)
    study = _study(
        tmp_path, synthetic_dir, {"workers": 4, "gpus_per_worker": 1, **H200}, FROZEN, max_concurrent_trials=2
    )
    assert given.packing is None and given.base_config.train.resolved().scaled_lr == pytest.approx(0.01)
    train = study.base_config.train
    assert (train.workers, train.images_per_worker, train.use_gpu) == (1, 8, True)
    assert train.resolved().scaled_lr == pytest.approx(0.01)
    res = study.cfg.resources_per_trial
    assert (res.workers, res.images_per_worker, res.gpus_per_worker) == (1, 8, 1)
    # 2 trials of 4 GPUs were allowed at once: 8 of 1 GPU on the same GPUs
    assert study.packing is not None and study.packing.trials_per_node == 4
    assert study.cfg.max_concurrent_trials == 8
    assert footprint(study.base_config.train) == ("GPU", 1) and study.trains_in_trial()
    # every trial, and a resumed study (rebuilt from its saved state), trains the packed layout
    trial = study.experiment(study.initial_points()[0]).train
    assert (trial.workers, trial.images_per_worker) == (1, 8)
    again = Study.from_resolved(study.resolved())
    assert (again.base_config.train.workers, again.cfg.max_concurrent_trials) == (1, 8)


def test_an_explicit_layout_is_taken_as_given(tmp_path, synthetic_dir):
    # 2 x 4 = batch 8: the LR scales with it (0.02 x 8 / 16)
    study = _study(tmp_path, synthetic_dir, {"workers": 2, "images_per_worker": 4, "gpus_per_worker": 1})
    train = study.base_config.train
    assert (train.workers, train.images_per_worker) == (2, 4)
    assert train.resolved().scaled_lr == pytest.approx(0.01)


def test_trainable_bn_keeps_the_given_layout(tmp_path, synthetic_dir):
    study = _study(
        tmp_path, synthetic_dir, {"workers": 8, "gpus_per_worker": 1, **H200}, ["model.norm=bn", "train.sync_bn=false"]
    )
    assert study.packing is not None and not study.packing.packed
    assert (study.base_config.train.workers, study.base_config.train.images_per_worker) == (8, 2)
    assert "trainable BN" in study.packing.reason and study.cfg.max_concurrent_trials == 2


def test_a_search_over_what_the_layout_is_chosen_on_keeps_it(tmp_path, synthetic_dir):
    space = {"model.min_size": {"type": "choice", "values": [64, 96]}}
    resources = {"workers": 8, "gpus_per_worker": 1, **H200}
    study = _study(tmp_path, synthetic_dir, resources, FROZEN, search_space=space)
    assert study.packing is not None and not study.packing.packed
    assert study.packing.reason == "the search varies model.min_size, which the layout is chosen on"


def test_a_search_that_switches_isr_p_on_names_it(tmp_path, synthetic_dir):
    space = {"model.isr_p.enabled": {"type": "choice", "values": [False, True]}}
    study = _study(
        tmp_path,
        synthetic_dir,
        {"workers": 8, "gpus_per_worker": 1, **H200},
        [*FROZEN, "model.isr_p.enabled=false", "model.carl.enabled=false"],
        search_space=space,
    )
    assert study.packing is not None and study.packing.packed
    assert "; ISR-P normalises over a worker's 16 images instead of 2" in study.packing.reason


def test_cpu_workers_keep_the_given_layout(tmp_path, synthetic_dir):
    study = _study(tmp_path, synthetic_dir, {"workers": 2, "gpus_per_worker": 0, **H200}, FROZEN)
    assert study.packing is not None and not study.packing.packed
    assert "train on CPUs" in study.packing.reason
    assert (study.base_config.train.workers, study.base_config.train.use_gpu) == (2, False)


def test_without_figures_or_a_gpu_the_layout_is_kept(tmp_path, synthetic_dir, monkeypatch):
    monkeypatch.setattr(probe, "local_gpu_gib", lambda: None)
    monkeypatch.setattr(probe, "probe_gpu_memory", lambda cfg: pytest.fail("probed without a GPU"))
    study = _study(tmp_path, synthetic_dir, {"workers": 8, "gpus_per_worker": 1, "pack": "auto"}, FROZEN)
    assert study.packing is not None and not study.packing.packed
    assert "gpu_mem_per_image_gib" in study.packing.reason
    card_unknown = _study(
        tmp_path,
        synthetic_dir,
        {"workers": 8, "gpus_per_worker": 1, "pack": "auto", "gpu_mem_per_image_gib": 3},
        FROZEN,
    )
    assert card_unknown.packing is not None and "gpu_mem_gib" in card_unknown.packing.reason


def test_a_probe_on_this_machines_gpu_supplies_the_figures(tmp_path, synthetic_dir, monkeypatch, capsys):
    measured = probe.MemoryProbe(6.0, 2.0, 80.0, "cuda (test GPU)", (2, 4), (14.0, 26.0))
    monkeypatch.setattr(probe, "local_gpu_gib", lambda: 80.0)
    monkeypatch.setattr(probe, "probe_gpu_memory", lambda cfg: measured)
    study = _study(tmp_path, synthetic_dir, {"workers": 8, "gpus_per_worker": 1, "pack": "auto"}, FROZEN)
    assert study.packing is not None and (study.packing.chosen.workers, study.packing.chosen.images_per_worker) == (
        2,
        8,
    )
    assert "from a probe on cuda (test GPU)" in study.packing.reason
    assert "measuring the GPU memory per image" in capsys.readouterr().out

    def broken(cfg):
        raise RuntimeError("out of luck")

    monkeypatch.setattr(probe, "probe_gpu_memory", broken)
    kept = _study(tmp_path, synthetic_dir, {"workers": 8, "gpus_per_worker": 1, "pack": "auto"}, FROZEN)
    assert kept.packing is not None and not kept.packing.packed
    assert kept.packing.reason == "the GPU memory probe failed: out of luck"


@pytest.mark.parametrize(
    "resources, message",
    [
        ({"pack": "yes"}, "resources_per_trial.pack: Input should be 'auto'"),
        ({"pack": "auto", "gpu_mem_per_image_gib": 0}, "resources_per_trial.gpu_mem_per_image_gib: Input should be"),
        ({"images_per_worker": 0}, "resources_per_trial.images_per_worker: Input should be greater"),
    ],
)
def test_a_bad_packing_field_is_one_line_naming_the_file(tmp_path, synthetic_dir, capsys, resources, message):
    path = write_study(tmp_path, synthetic_dir, "bad-pack", resources_per_trial={"workers": 8, **resources})
    with pytest.raises(ConfigError) as err:
        load_study(path)
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value)
    code = cli.main(["study", "plan", str(path), "--gpus", "8"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0]


# ---------------------------------------------------------------- the plan and the start


def test_the_plan_shows_the_packed_layout_and_its_trials_at_once(tmp_path, synthetic_dir):
    study = _study(
        tmp_path,
        synthetic_dir,
        {"workers": 8, "gpus_per_worker": 1, **H200},
        [*FROZEN, "train.epochs=2"],
        num_samples=8,
        max_concurrent_trials=1,
        scheduler={"type": "fifo"},
    )
    plan = make_plan(study.workload(), assumed_cluster(8), images=32, rate=Rate(images_per_sec=16.0, source="test"))
    # 8 trials of 1 GPU, all at once on 8 GPUs: one wave of 2 epochs of 32 images at 16 img/s
    assert (plan.workers, plan.images_per_worker, plan.at_once, plan.iters_per_epoch) == (1, 16, 8, 2)
    assert plan.fifo.trial_epochs == 16 and plan.fifo.wave_epochs == 2
    assert plan.fifo.hours == pytest.approx(16 * 2.0 * 1 / 3600) and plan.fifo.wall_s == pytest.approx(2 * 2.0)
    text = " ".join(plan.text().split())  # the table wraps long rows
    assert "per trial 1 worker(s) x 16 images = batch 16; 1 GPU(s) per worker; packed from 8 worker(s)" in text
    assert "at once 8 trial(s), on 8 GPU(s) (--gpus)" in text
    assert "note: trial layout 1 worker(s) x 16 images on 1 GPU(s) instead of 8 worker(s) x 2 images" in text
    assert "ISR-P and CARL normalise over a worker's 16 images instead of 2" in text


def test_the_plan_says_why_packing_was_refused(tmp_path, synthetic_dir):
    study = _study(
        tmp_path, synthetic_dir, {"workers": 8, "gpus_per_worker": 1, **H200}, ["model.norm=bn", "train.sync_bn=false"]
    )
    text = " ".join(
        make_plan(study.workload(), assumed_cluster(8), images=32, rate=None, rate_note="none").text().split()
    )
    assert "8 worker(s) x 2 images = batch 16; 1 GPU(s) per worker; as given (pack: auto kept it" in text
    assert "note: trial layout 8 worker(s) x 2 images on 8 GPU(s) kept: trainable BN" in text


def test_the_study_start_prints_the_layout(tmp_path, synthetic_dir, monkeypatch, capsys):
    from pisa.search import tuner

    study = _study(tmp_path, synthetic_dir, {"workers": 8, "gpus_per_worker": 1, **H200}, FROZEN)

    def no_plan(*args):
        raise RuntimeError("no plan here")

    monkeypatch.setattr(tuner, "plan_at_start", no_plan)
    tuner._print_start(study, study.base_config.tracking.resolved_uri(), "parent")
    out = capsys.readouterr().out.splitlines()
    assert "[pisa] " + study.packing.line() in out
