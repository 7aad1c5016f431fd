"""A trained detector as a registered MLflow model: weights, config and class names in one
pyfunc whose `predict` takes images and returns boxes, labels and scores.

The package holds the model's weights only (no optimizer state), saved as a plain state
dict and read back with `torch.load(weights_only=True)`. Registering sets the alias
`champion`, so `mlflow.pyfunc.load_model("models:/NAME@champion")` gets the winner.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from ..core.checkpoint import CONFIG_FILE, checkpoint_file
from ..core.version import VERSION, check_written_by
from . import tags
from .detector import (
    Category,
    PredictInputError,
    build_detector,
    load_checkpoint_dir,
    load_weights,
    read_config,
    read_image,
)
from .store import tracker
from .tags import SOURCE_RUN_ID

log = logging.getLogger(__name__)

ALIAS = "champion"
ARTIFACT_NAME = "model"
WEIGHTS_FILE = "weights.pt"  # beside it CONFIG_FILE, the training config, named as in a checkpoint
CLASSES_FILE = "classes.json"
IMAGE_COLUMN = "image"
PISA_VERSION_KEY = "pisa_version"  # in the model's metadata: the release that logged it


class PisaDetectorModel(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]  # mlflow does not type its re-export
    """Input: a DataFrame with an `image` column of encoded image bytes (PNG, JPEG...).
    Output: one row per image with `boxes` ([x1, y1, x2, y2] pixels), `labels` (1..C),
    `category_ids` (the COCO ids), `names` and `scores`."""

    _skip_type_hint_validation = True  # the signature given at logging validates the input

    def load_context(self, context) -> None:
        cfg = read_config(context.artifacts["config"])
        classes = json.loads(Path(context.artifacts["classes"]).read_text())
        categories = [Category(int(c["id"]), str(c["name"])) for c in classes]
        self.detector = build_detector(cfg, categories, load_weights(context.artifacts["weights"]))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        score_thr = float((params or {}).get("score_thr", 0.0))
        images = [decode_image(b) for b in _images_of(model_input)]
        rows = []
        for det in self.detector.predict(images, score_thr=score_thr):
            labels = [int(v) for v in det.labels.tolist()]
            rows.append(
                {
                    "boxes": [[float(x) for x in box] for box in det.boxes.tolist()],
                    "labels": labels,
                    "category_ids": [self.detector.category_id(v) for v in labels],
                    "names": [self.detector.name_of(v) for v in labels],
                    "scores": [float(s) for s in det.scores.tolist()],
                }
            )
        return pd.DataFrame(rows, columns=["boxes", "labels", "category_ids", "names", "scores"])


def _images_of(model_input) -> list[bytes]:
    if hasattr(model_input, "columns"):
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(f"model input needs an {IMAGE_COLUMN!r} column of encoded image bytes")
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, (bytes, bytearray)):
        return [bytes(model_input)]
    return list(model_input)


def decode_image(data: bytes):
    """Encoded image bytes -> float CHW RGB in [0, 1]."""
    import base64

    import torch
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    if isinstance(data, str):  # JSON (model serving) carries bytes as base64
        data = base64.b64decode(data)
    with Image.open(io.BytesIO(data)) as im:
        image = im.convert("RGB")
    return F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)


def encode_png(image) -> bytes:
    """A float CHW image in [0, 1] as PNG bytes (the input format of the model)."""
    import torch
    from torchvision.io import encode_png as _encode

    return bytes(_encode((image * 255).round().to(torch.uint8)).numpy().tobytes())


@contextlib.contextmanager
def _tracking(uri: str):
    """MLflow's fluent API pointed at `uri` for the block, then put back. The registry URI is
    left unset: MLflow then derives it from the tracking URI (setting and restoring it would
    pin the process to whichever store was current before)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@dataclass
class RegisteredModel:
    name: str
    version: str
    alias: str
    model_uri: str  # models:/NAME@champion
    run_id: str


def log_detector_model(uri: str, run_id: str, checkpoint: str | Path, model_name: str | None) -> RegisteredModel | None:
    """Log a checkpoint's weights as a pyfunc model into run `run_id`; register it as
    `model_name` with alias `champion` when a name is given."""
    from mlflow.models import infer_signature

    detector = load_checkpoint_dir(checkpoint)  # checks weights, config and classes fit together
    ckpt = checkpoint_file(checkpoint)
    with tempfile.TemporaryDirectory(prefix="pisa-register-") as tmp:
        import pandas as pd
        import torch

        weights = Path(tmp) / WEIGHTS_FILE
        torch.save(load_weights(ckpt), weights)  # the model only: no optimizer or scheduler state
        config = Path(tmp) / CONFIG_FILE
        config.write_text(detector.config.model_dump_json(indent=2))
        classes = Path(tmp) / CLASSES_FILE
        classes.write_text(json.dumps([{"id": c.id, "name": c.name} for c in detector.categories], indent=2))
        example = pd.DataFrame({IMAGE_COLUMN: [encode_png(_example_image(detector))]})
        python_model = PisaDetectorModel()
        python_model.detector = detector
        output = python_model.predict(None, example)
        signature = infer_signature(example, output, params={"score_thr": 0.0})
        with _tracking(uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=ARTIFACT_NAME,
                python_model=PisaDetectorModel(),
                artifacts={"weights": str(weights), "config": str(config), "classes": str(classes)},
                signature=signature,
                input_example=example,
                pip_requirements=_requirements(),
                registered_model_name=model_name or None,
                metadata={"classes": [c.name for c in detector.categories], PISA_VERSION_KEY: VERSION},
            )
    if not model_name:
        return None
    version = str(info.registered_model_version)
    tracker(uri).alias_model_version(model_name, version, ALIAS, {SOURCE_RUN_ID: run_id})
    try:  # which study, trial, metric and value: shown beside the version in MLflow's UI
        tracker(uri).describe_model_version(model_name, version, version_description(tracker(uri).run(run_id)))
    except Exception as exc:  # a description must never cost the registration
        log.warning("model %s version %s left without a description: %s", model_name, version, exc)
    return RegisteredModel(model_name, version, ALIAS, f"models:/{model_name}@{ALIAS}", run_id)


def _example_image(detector):
    """A small real image when the val set is at hand, else a grey square."""
    import torch

    data = detector.config.data
    grey = torch.full((3, 64, 64), 0.5)
    if data.val_annotations is None or data.val_images is None:
        return grey
    try:
        ann = json.loads(data.val_annotations.read_text())
        first = sorted(ann["images"], key=lambda i: int(i["id"]))[0]
        image = read_image(data.val_images / first["file_name"])
        scale = 128 / max(image.shape[-2:])
        if scale < 1:
            import torch.nn.functional as F

            image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", antialias=True)[0].clamp(0, 1)
        return image
    except Exception:  # an example for the signature, never a reason to fail the registration
        return grey


def _requirements() -> list[str]:
    from importlib import metadata

    out = []
    for dist in ("torch", "torchvision", "pillow", "pandas", "mlflow", "pydantic", "pyyaml", "pycocotools"):
        try:
            out.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pass
    return out


def _short(value: str) -> str:
    """A tag's number as a reader wants it (the tag keeps every digit)."""
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def version_description(run) -> str:
    """A registered version's description from its run: the study and trial it came from (if
    any) and its best value of each metric it has one of (`pisa.best_<metric>` tags)."""
    run_tags = run.data.tags
    parts = [f"run {run.info.run_id}" + (f" ({run.info.run_name})" if run.info.run_name else "")]
    if run_tags.get(tags.STUDY):
        parts.append(f"study {run_tags[tags.STUDY]}")
    if run_tags.get(tags.TRIAL):
        parts.append(f"trial {run_tags[tags.TRIAL]}")
    best = {k[len(tags.BEST_PREFIX) :]: v for k, v in sorted(run_tags.items()) if k.startswith(tags.BEST_PREFIX)}
    for own in ("run_id", "trial"):  # the study run's pisa.best_run_id and pisa.best_trial
        best.pop(own, None)
    values = [f"{metric} {_short(value)}" for metric, value in best.items()]
    if not values:
        values = [f"{k} {v:.4g}" for k, v in sorted(run.data.metrics.items()) if k.startswith("bbox_mAP")]
    return "; ".join(parts) + (f"; best {', '.join(values)}" if values else "")


def register_run(uri: str, run_id: str, model_name: str) -> RegisteredModel:
    """Register a finished run's best checkpoint (its `checkpoint/` artifact)."""
    with tempfile.TemporaryDirectory(prefix="pisa-ckpt-") as tmp:
        try:
            local = tracker(uri).download_artifact(run_id, "checkpoint", tmp)
        except Exception:
            raise PredictInputError(
                f"run {run_id}: no checkpoint/ artifact to register (was tracking.log_checkpoint off?)"
            ) from None
        registered = log_detector_model(uri, run_id, local, model_name)
    assert registered is not None
    return registered


def load_pyfunc(model_uri: str, uri: str):
    """The pyfunc model at `model_uri`; one written by another pisa release is a one-line
    error (its pickled class is named by that release's module path)."""
    with _tracking(uri):
        written = (mlflow.models.get_model_info(model_uri).metadata or {}).get(PISA_VERSION_KEY)
        remedy = "load it with that version, or register the run's checkpoint again (`pisa register RUN_ID`)"
        if written is not None:
            check_written_by(written, f"model {model_uri}", remedy, PredictInputError)
        try:
            return mlflow.pyfunc.load_model(model_uri)
        except (ModuleNotFoundError, AttributeError) as exc:
            if "pisa" not in str(exc):
                raise
            check_written_by(None, f"model {model_uri}", remedy, PredictInputError)
            raise


def logged_model_uri(uri: str, run_id: str) -> str | None:
    """The `models:/` URI of the pisa model logged in a run, if there is one."""
    with _tracking(uri):
        try:
            experiment_id = tracker(uri).experiment_of(run_id)
            models = mlflow.search_logged_models(
                experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'", output_format="list"
            )
        except Exception:
            return None
    for m in models:
        if m.name == ARTIFACT_NAME:
            return f"models:/{m.model_id}"
    return None
