"""Shared fixtures: the real BCCD dataset and a small generated synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_bccd() -> Path:
    """`$PISA_BCCD_DIR`, else `<repo>/../shared/datasets/bccd` (CI keeps shared/ beside the clone)."""
    env = os.environ.get("PISA_BCCD_DIR")
    return Path(env) if env else REPO.parent / "shared" / "datasets" / "bccd"


@pytest.fixture(scope="session")
def bccd_dir() -> Path:
    path = find_bccd()
    needed = [path / "train.json", path / "val.json", path / "images"]
    if not all(p.exists() for p in needed):
        pytest.fail(
            f"BCCD dataset not found at {path} (needs train.json, val.json, images/). "
            "Put shared/datasets/bccd beside the repository or set PISA_BCCD_DIR.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic shapes dataset (24 train, 8 val images), generated once per session."""
    from pisa.data import generate_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, n_train=24, n_val=8, seed=0)
    return out


def tiny_experiment(data_dir: Path, work: Path, **train) -> dict:
    """A training config small enough for a 2-worker CPU run in well under a minute."""
    return {
        "name": "tiny",
        "model": {
            "detector": "faster_rcnn", "backbone": "mobilenet_v3_fpn", "norm": "bn",
            "min_size": 96, "max_size": 96,
            "rpn_pre_nms_top_n_train": 150, "rpn_post_nms_top_n_train": 150,
            "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 100,
            "rois_per_image": 32, "sampler": "random",
            "isr_p": {"enabled": True}, "carl": {"enabled": True},
        },
        "data": {
            "train_images": str(data_dir / "train"), "train_annotations": str(data_dir / "train.json"),
            "val_images": str(data_dir / "val"), "val_annotations": str(data_dir / "val.json"),
            "train_limit": 8, "val_limit": 4,
        },
        "train": {
            "schedule": "custom", "epochs": 2, "lr": 0.02, "base_batch": 16, "milestones": [],
            "warmup_iters": 2, "workers": 2, "use_gpu": False, "images_per_worker": 2,
            "log_every": 1, "seed": 0, **train,
        },
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "tests"},
        "storage_path": str(work / "ray_results"),
    }


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster (2 CPUs) for the whole session."""
    import ray

    from pisa.train import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
