"""Cluster settings resolved before anything starts: per-worker resources in the trial's
ScalingConfig, storage locations, credentials kept out of what is stored, Ray Client limits."""

from __future__ import annotations

import pytest
import yaml
from helpers import tiny_experiment

from pisa.core import storage
from pisa.core.config import ConfigError, parse_config
from pisa.core.uris import public_uri, redact
from pisa.search.study import load_study
from pisa.tracking.store import _param_value
from pisa.training.cluster import check_cluster_setup
from pisa.training.train import scaling_config


def _study(tmp_path, synthetic_dir, resources) -> object:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment(synthetic_dir, tmp_path)))
    spec = {
        "name": "res",
        "base": "base.yaml",
        "resources_per_trial": resources,
        "search_space": {"model.isr_p.k": {"type": "uniform", "low": 0.5, "high": 3.0}},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    return load_study(tmp_path / "s.yaml")


def test_trial_scaling_config_takes_the_study_resources(tmp_path, synthetic_dir):
    study = _study(
        tmp_path,
        synthetic_dir,
        {"workers": 3, "cpus_per_worker": 2.5, "gpus_per_worker": 0.25, "resources_per_worker": {"node_a": 1}},
    )
    scaling = scaling_config(study.experiment({"model.isr_p.k": 1.0}))
    assert scaling.num_workers == 3 and scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 2.5, "GPU": 0.25, "node_a": 1}


def test_cpu_trials_ask_for_no_gpu(tmp_path, synthetic_dir):
    study = _study(tmp_path, synthetic_dir, {"workers": 2, "cpus_per_worker": 0.5, "gpus_per_worker": 0})
    scaling = scaling_config(study.experiment({}))
    assert not scaling.use_gpu and scaling.resources_per_worker == {"CPU": 0.5}


def test_storage_locations(tmp_path):
    assert storage.normalize("runs", tmp_path) == str(tmp_path / "runs")
    assert storage.normalize("s3://bucket/runs/") == "s3://bucket/runs"
    assert storage.normalize(f"file://{tmp_path}/x") == f"{tmp_path}/x"
    assert storage.join("s3://bucket/runs", "study", "pisa_study.json") == "s3://bucket/runs/study/pisa_study.json"
    assert storage.location_of("bucket/runs/ckpt", "s3://bucket/runs") == "s3://bucket/runs/ckpt"
    assert storage.location_of("/abs/ckpt", "/abs") == "/abs/ckpt"
    cfg = parse_config({"data": {"synthetic": {"out": "x"}}, "storage_path": "gs://b/p"})
    assert cfg.storage_path == "gs://b/p"
    storage.write_text(str(tmp_path / "a" / "b.json"), "{}")
    assert storage.exists(str(tmp_path / "a" / "b.json")) and storage.read_text(str(tmp_path / "a" / "b.json")) == "{}"


def test_credentials_are_masked_in_output_and_absent_from_what_is_stored(synthetic_dir, tmp_path):
    uri = "http://alice:s3cr3t@mlflow.example:5000"
    assert redact(uri) == "http://alice:***@mlflow.example:5000"
    assert public_uri(uri) == "http://mlflow.example:5000"
    assert _param_value(uri) == "http://mlflow.example:5000"
    data = tiny_experiment(synthetic_dir, tmp_path)
    data["tracking"]["uri"] = uri
    assert "s3cr3t" not in parse_config(data).to_yaml()


def test_ray_client_needs_a_tracking_server():
    with pytest.raises(ConfigError, match="use a tracking server"):
        check_cluster_setup("ray://head:10001", "sqlite:////tmp/mlflow.db", "s3://b/p", "study.yaml")
    assert check_cluster_setup("ray://head:10001", "http://mlflow:5000", "s3://b/p", "study.yaml") == []
    assert check_cluster_setup("ray://head:10001", "http://mlflow:5000", "/data/runs", "s") != []
    assert check_cluster_setup("head:6379", "sqlite:////tmp/mlflow.db", "/data/runs", "s") == []


def test_start_up_failures_a_second_try_gets_past():
    from pisa.training.ray_runtime import _worth_retrying

    # a local node slow to register, a Ray Client session whose server process died at start
    assert _worth_retrying(None, RuntimeError("The current node timed out during startup."))
    assert _worth_retrying("ray://head:10001", ConnectionAbortedError("Initialization failure from server"))
    # not: a refused or unreachable cluster, a joined GCS address, any other local error
    assert not _worth_retrying("ray://head:10001", ConnectionError("ray client connection timeout"))
    assert not _worth_retrying("head:6379", ConnectionAbortedError("Initialization failure from server"))
    assert not _worth_retrying(None, RuntimeError("Address already in use"))
