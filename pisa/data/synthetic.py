"""A small, deterministic, learnable COCO dataset of coloured shapes.

It lets every part of the pipeline (training, PISA sampling, COCO evaluation, studies) run in
seconds on a CPU without downloading anything. The same seed gives byte-identical JSON and PNG
files (for a given numpy/Pillow/pycocotools install). Shapes never share pixels, so each box is
tight around the visible shape and each polygon is exactly what was drawn (pycocotools
rasterizes it); their boxes may still overlap (IoU-HLR needs crowded neighbourhoods).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pisa.core.errors import DataError

if TYPE_CHECKING:
    from pisa.core.config import SyntheticConfig

__all__ = ["CLASSES", "generate_synthetic", "ensure_synthetic", "synth_command"]

CLASSES = ("circle", "square", "triangle")
_COLORS = np.array([(225, 45, 45), (40, 190, 60), (45, 85, 235)], dtype=np.float64)
_META = "synthetic.json"
_FORMAT_VERSION = 1
MIN_IMAGE_SIZE = 32  # pixels: the smallest image the shapes' size range fits in


def _shape_polygon(kind: str, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """Vertices (K, 2) of a shape whose extent is about `size` pixels."""
    if kind == "circle":
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        r = size / 2
    elif kind == "square":
        t = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi + angle
        r = size / 2 * math.sqrt(2) / (abs(math.cos(angle)) + abs(math.sin(angle)))
    else:  # equilateral triangle, centred on its centroid
        t = np.array([0.0, 2 / 3, 4 / 3]) * math.pi + angle
        r = size / math.sqrt(3)
    pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    return np.round(pts, 1)


def _rasterize(poly: np.ndarray, size: int) -> np.ndarray:
    """The polygon's pixels exactly as pycocotools rasterizes it, so the drawn shape, its mask
    target (`annToMask`) and its box agree to the pixel."""
    rles = mask_utils.frPyObjects([poly.reshape(-1).tolist()], size, size)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted, low-contrast texture: a tinted grey plus a few smooth waves (noise comes later)."""
    base = rng.uniform(95, 165) + rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    tex = np.zeros((size, size))
    for _ in range(3):
        fx, fy = rng.uniform(0.5, 4.0, size=2)
        phase = rng.uniform(0, 2 * math.pi)
        tex += rng.uniform(4, 10) * np.sin(2 * math.pi * (fx * xx + fy * yy) + phase)
    img = base[None, None, :] + tex[:, :, None]
    return img


def _make_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    img = _background(rng, size)
    occupied = np.zeros((size, size), dtype=bool)
    n_objects = int(rng.integers(1, 7))
    lo, hi = max(8.0, 0.09 * size), 0.9 * size
    sizes = np.sort(np.exp(rng.uniform(math.log(lo), math.log(hi), size=n_objects)))[::-1]
    objects: list[dict[str, Any]] = []
    for obj_size in sizes:
        cls = int(rng.integers(0, len(CLASSES)))
        kind = CLASSES[cls]
        for _attempt in range(40):
            s = float(obj_size) * (0.93**_attempt)  # shrink if it does not fit
            if s < 6:
                break
            if kind == "square":
                angle = float(rng.uniform(-math.pi / 9, math.pi / 9))
            else:
                angle = float(rng.uniform(0, 2 * math.pi))
            half = min(s * 0.5 + 1, size / 2)
            if objects and rng.random() < 0.6:  # near a neighbour, so boxes overlap
                other = objects[int(rng.integers(0, len(objects)))]["box"]
                ox, oy = (other[0] + other[2]) / 2, (other[1] + other[3]) / 2
                reach = (other[2] - other[0] + other[3] - other[1]) / 4 + s / 2
                cx, cy = ox + rng.uniform(-reach, reach), oy + rng.uniform(-reach, reach)
            else:
                cx, cy = rng.uniform(half, size - half), rng.uniform(half, size - half)
            poly = _shape_polygon(kind, float(cx), float(cy), s, angle)
            if poly.min() < 1 or poly.max() > size - 2:
                continue
            mask = _rasterize(poly, size)
            grown = mask.copy()  # keep a 1px gap so neighbours stay separable
            grown[1:] |= mask[:-1]
            grown[:-1] |= mask[1:]
            grown[:, 1:] |= grown[:, :-1].copy()
            grown[:, :-1] |= grown[:, 1:].copy()
            if not mask.any() or (grown & occupied).any():
                continue
            occupied |= mask
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            color = np.clip(_COLORS[cls] + rng.uniform(-25, 25, size=3), 0, 255)
            img[mask] = color
            objects.append({"cls": cls, "poly": poly, "mask": mask, "box": box})
            break
    img = img + rng.normal(0, 6, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), objects


def _write_split(
    out_dir: Path, split: str, n_images: int, rng: np.random.Generator, size: int, seed: int
) -> dict[str, int]:
    img_dir = out_dir / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(n_images):
        pixels, objects = _make_image(rng, size)
        file_name = f"{i:06d}.png"
        Image.fromarray(pixels).save(img_dir / file_name, format="PNG")
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            x1, y1, x2, y2 = obj["box"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["cls"] + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": int(obj["mask"].sum()),
                    "segmentation": [[round(float(v), 1) for v in obj["poly"].reshape(-1)]],
                    "iscrowd": 0,
                }
            )
    doc = {
        "info": {"description": f"pisa synthetic shapes, split {split}, seed {seed}", "version": "1"},
        "licenses": [],
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)],
        "images": images,
        "annotations": annotations,
    }
    (out_dir / f"{split}.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    return {"images": len(images), "annotations": len(annotations)}


def generate_synthetic(
    out_dir: str | Path, n_train: int, n_val: int, seed: int = 0, image_size: int = 128
) -> dict[str, dict[str, int]]:
    """Write `train/`, `val/`, `train.json`, `val.json` (and `synthetic.json`) into `out_dir`.

    Train and val come from independent streams of `seed`, so growing `n_train` leaves the
    val set unchanged. Returns image and annotation counts per split.
    """
    if n_train < 1 or n_val < 1:
        raise ValueError("n_train and n_val must be >= 1")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    counts = {
        "train": _write_split(out, "train", n_train, train_rng, image_size, seed),
        "val": _write_split(out, "val", n_val, val_rng, image_size, seed),
    }
    meta = _meta(n_train, n_val, seed, image_size)
    (out / _META).write_text(json.dumps(meta, sort_keys=True) + "\n")
    return counts


def _meta(n_train: int, n_val: int, seed: int, image_size: int) -> dict[str, int]:
    return {"format": _FORMAT_VERSION, "train": n_train, "val": n_val, "seed": seed, "image_size": image_size}


def ensure_synthetic(cfg: SyntheticConfig) -> Path:
    """Generate the dataset described by a `SyntheticConfig` unless it is already there.

    Safe when several Ray workers call it at once: each generates into a private temporary
    folder and renames it into place atomically; a loser of the race discards its copy and
    uses the winner's (identical, since generation is deterministic).
    """
    out = Path(cfg.out)
    wanted = _meta(cfg.train, cfg.val, cfg.seed, cfg.image_size)

    def existing() -> bool:
        meta_path = out / _META
        if meta_path.is_file():
            try:
                found = json.loads(meta_path.read_text())
            except json.JSONDecodeError:
                found = None
            if found != wanted:
                raise DataError(
                    f"{out}: holds a synthetic dataset generated with {found}, but the config asks "
                    f"for {wanted}; delete the folder or choose another 'synthetic.out'"
                )
            return True
        if (out / "train.json").is_file() and (out / "val.json").is_file():
            return True  # a dataset placed there by hand: use it as is
        return False

    if existing():
        return out
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists, is not empty and holds no train.json/val.json to use")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate_synthetic(tmp, cfg.train, cfg.val, seed=cfg.seed, image_size=cfg.image_size)
        try:
            os.rename(tmp, out)  # atomic; replaces only a missing or empty folder
        except OSError:
            if not existing():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def synth_command(
    out: str | Path, train: int, val: int, seed: int = 0, image_size: int = 128
) -> dict[str, dict[str, int]]:
    """`pisa data synth`: generate the synthetic dataset and print what was written."""
    counts = generate_synthetic(out, train, val, seed=seed, image_size=image_size)
    out = Path(out)
    for split, c in counts.items():
        print(f"{split}: {c['images']} images, {c['annotations']} boxes -> {out / split}/, {out / (split + '.json')}")
    print(f"classes: {', '.join(CLASSES)}; image size {image_size}x{image_size}; seed {seed}")
    return counts
