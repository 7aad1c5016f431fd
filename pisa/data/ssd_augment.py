"""SSD's training augmentation as mmdetection's SSD configs (`ssd300_coco.py`, `ssd512_coco.py`) run it.

`PhotoMetricDistortion(brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5,
1.5), hue_delta=18)`, `Expand(mean, ratio_range=(1, 4))` with probability 0.5,
`MinIoURandomCrop(min_ious=(0.1, 0.3, 0.5, 0.7, 0.9), min_crop_size=0.3)`, then the resize to
the fixed square (bilinear, no antialiasing); the flip follows in `DetectionTransform`. As there:
each photometric step has probability 1/2, brightness is additive, contrast a product, saturation
and hue act in HSV (OpenCV's float formulas, which mmcv's `bgr2hsv`/`hsv2bgr` call), contrast
comes first or last, the channels may be permuted; pixel values are float32 and unclipped until
the end; the zoom-out canvas is the mean colour (123.675, 116.28, 103.53); a crop patch is kept
only if *every* box reaches the drawn IoU with it and at least one box centre lies inside it;
boxes whose centre is outside are dropped, the others clipped to it. (torchvision's
`RandomPhotometricDistort`/`RandomIoUCrop`, used before, scale brightness, blend contrast and
saturation with the grey mean, clamp after every step and accept a patch when *one* box reaches
the IoU.) One difference remains: the image leaves as uint8 (the detector scales it on its
device), so the final values are rounded and clipped to [0, 255] where mmdetection normalises
the float values as they are.

Two implementations of the same draws (`SSDDraws`, drawn from torch's RNG, which `PerImageDraws`
seeds per image): `reference_ssd_augment`, the straightforward order (distort the whole image,
build the whole canvas, crop it, resize), and `ssd_augment`, the one the loader runs: it takes
only the image rows and columns that the bilinear resize reads (at most two per output row and
column, whatever the zoom; a column range whole when most of it is read), as uint8 in the decoded
pixel order, and distorts them (every photometric step is per pixel) in cache-sized chunks with
the steps folded into a few passes over the raw values (`_distort_chunk`); the canvas is one more
row and column of its colour; then it interpolates with the resize's own taps and weights. Same
boxes, same pixels up to float rounding (tests/test_ssd_augment.py); a fraction of the work
(benchmarks/bench_ssd_transform.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "SSD_MEAN",
    "Photometric",
    "SSDDraws",
    "draw_ssd",
    "photometric_distort",
    "reference_ssd_augment",
    "ssd_augment",
]

SSD_MEAN = (123.675, 116.28, 103.53)  # RGB: mmdetection's img_norm_cfg mean, the Expand canvas
BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18.0
EXPAND_PROB = 0.5
EXPAND_RATIO = (1.0, 4.0)
MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9)
SAMPLE_MODES = (1.0, *MIN_IOUS, 0.0)  # 1: no crop; 0: any patch holding a box centre
MIN_CROP_SIZE = 0.3
CROP_TRIALS = 50
_FLT_EPSILON = 1.1920929e-07  # OpenCV's FLT_EPSILON in its float HSV conversion
_HUE_SHIFTS = torch.tensor([0.0, 120.0, 240.0])  # where red, green and blue peak in the hue circle


@dataclass(frozen=True)
class Photometric:
    """One image's photometric draws; None: the step is skipped."""

    brightness: float | None = None  # added
    contrast: float | None = None  # multiplied
    contrast_first: bool = False  # before the HSV steps (mmdetection's mode 1), else after
    saturation: float | None = None  # multiplies S
    hue: float | None = None  # degrees added to H
    permutation: tuple[int, int, int] | None = None  # of the channels


@dataclass(frozen=True)
class SSDDraws:
    """One image's draws: photometric, the zoom-out canvas and the crop patch."""

    photometric: Photometric
    canvas: tuple[int, int, int, int] | None  # (height, width, top, left): the image's place on it
    patch: tuple[int, int, int, int] | None  # (x0, y0, x1, y1) on the canvas (the image if no canvas)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), dtype=torch.float64))


def _coin() -> bool:
    return bool(torch.randint(2, ()))


def _draw_photometric() -> Photometric:
    """In mmdetection's order: brightness, mode, contrast, saturation, hue, channel swap."""
    brightness = _uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA) if _coin() else None
    contrast_first = _coin()
    contrast = _uniform(*CONTRAST_RANGE) if _coin() else None
    saturation = _uniform(*SATURATION_RANGE) if _coin() else None
    hue = _uniform(-HUE_DELTA, HUE_DELTA) if _coin() else None
    permutation = tuple(torch.randperm(3).tolist()) if _coin() else None
    return Photometric(brightness, contrast, contrast_first, saturation, hue, permutation)


def _centres_inside(boxes: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """(P, N): box n's centre strictly inside patch p (mmdetection's test)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    return (
        (centre[None, :, 0] > patches[:, None, 0])
        & (centre[None, :, 1] > patches[:, None, 1])
        & (centre[None, :, 0] < patches[:, None, 2])
        & (centre[None, :, 1] < patches[:, None, 3])
    )


def _draw_patch(height: int, width: int, boxes: torch.Tensor) -> tuple[int, int, int, int] | None:
    """MinIoURandomCrop's patch on a `height` x `width` image with `boxes` (float64, xyxy).

    A mode (no crop, or a minimum IoU) is drawn; up to 50 patches of 0.3-1 times each side with
    an aspect ratio in [1/2, 2] are tried, the first with every box at that IoU and a box centre
    inside is taken; if none is, a new mode is drawn. The 50 trials are drawn at once (the same
    distribution as drawing them one by one until one passes)."""
    b = boxes.numpy()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    centre = (b[:, :2] + b[:, 2:]) / 2
    while True:
        mode = SAMPLE_MODES[int(torch.randint(len(SAMPLE_MODES), ()))]
        if mode == 1.0:
            return None
        # in numpy: the same float64 arithmetic as torch's and torchvision's box_iou, without
        # a tensor op's overhead on these 50 x N values
        u = torch.rand(CROP_TRIALS, 4, dtype=torch.float64).numpy()
        new_w = MIN_CROP_SIZE * width + (1 - MIN_CROP_SIZE) * width * u[:, 0]
        new_h = MIN_CROP_SIZE * height + (1 - MIN_CROP_SIZE) * height * u[:, 1]
        left = u[:, 2] * (width - new_w)
        top = u[:, 3] * (height - new_h)
        patches = np.floor(np.stack([left, top, left + new_w, top + new_h], axis=1))  # int(), all >= 0
        ratio = new_h / new_w
        ok = (ratio >= 0.5) & (ratio <= 2) & (patches[:, 2] != patches[:, 0]) & (patches[:, 3] != patches[:, 1])
        if len(b) and ok.any():
            lt = np.maximum(patches[:, None, :2], b[:, :2])
            rb = np.minimum(patches[:, None, 2:], b[:, 2:])
            wh = np.clip(rb - lt, 0, None)
            inter = wh[:, :, 0] * wh[:, :, 1]
            patch_area = (patches[:, 2] - patches[:, 0]) * (patches[:, 3] - patches[:, 1])
            iou = inter / (patch_area[:, None] + area - inter)
            ok &= iou.min(axis=1) >= mode
            inside = (
                (centre[None, :, 0] > patches[:, None, 0])
                & (centre[None, :, 1] > patches[:, None, 1])
                & (centre[None, :, 0] < patches[:, None, 2])
                & (centre[None, :, 1] < patches[:, None, 3])
            )
            ok &= inside.any(axis=1)
        passed = np.flatnonzero(ok)
        if len(passed):
            x0, y0, x1, y1 = (int(v) for v in patches[passed[0]])
            return x0, y0, x1, y1


def draw_ssd(height: int, width: int, boxes: torch.Tensor) -> SSDDraws:
    """One image's draws from torch's RNG: photometric, zoom-out (probability 1/2, 1-4x), crop."""
    photometric = _draw_photometric()
    canvas = None
    boxes = boxes.to(torch.float64)
    if float(torch.rand((), dtype=torch.float64)) <= EXPAND_PROB:  # mmdetection: skip if u > prob
        ratio = _uniform(*EXPAND_RATIO)
        left = int(_uniform(0, width * ratio - width))
        top = int(_uniform(0, height * ratio - height))
        canvas = (int(height * ratio), int(width * ratio), top, left)
        boxes = boxes + torch.tensor([left, top, left, top], dtype=torch.float64)
        height, width = canvas[0], canvas[1]
    return SSDDraws(photometric, canvas, _draw_patch(height, width, boxes))


# ---------------------------------------------------------------- photometric, per pixel


def _saturation_hue(x: torch.Tensor, saturation: float | None, hue: float | None) -> torch.Tensor:
    """mmcv's `bgr2hsv`, S x `saturation`, H + `hue` (wrapped), `hsv2bgr` on float RGB `x` (3, ...).

    OpenCV's float formulas: V = max, S = (V - min) / (|V| + eps), H from the largest channel
    (red, then green, then blue on ties), and back each channel is V (1 - S w) with w in [0, 1]
    the channel's distance in the hue hexagon (OpenCV's sector table, as one expression). Written
    with arithmetic masks and in-place steps: `where`, `remainder` and `argmax` cost several
    times an addition on the CPU."""
    r, g, b = x[0], x[1], x[2]
    v = x.amax(0)
    diff = v - x.amin(0)
    is_r = r == v
    is_g = (g == v) & ~is_r
    is_b = ~(is_r | is_g)
    h = (g - b) * is_r + (b - r) * is_g + (r - g) * is_b
    h *= 60.0 / (diff + _FLT_EPSILON)
    h += 120.0 * is_g + 240.0 * is_b
    h += 360.0 * (h < 0)
    s = diff.div_(v.abs() + _FLT_EPSILON)
    if saturation is not None:
        s *= saturation
    if hue is not None:
        h += hue
        h -= 360.0 * (h > 360)
        h += 360.0 * (h < 0)
    w = h.unsqueeze(0) - _HUE_SHIFTS.view(3, *([1] * h.dim()))  # each channel's hue offset
    w += 360.0 * (w < 0)
    w -= 180.0
    w.abs_().mul_(-1.0 / 60.0).add_(2.0).clamp_(0.0, 1.0)
    return w.mul_(s).neg_().add_(1.0).mul_(v)


def _saturation(x: torch.Tensor, saturation: float) -> torch.Tensor:
    """`_saturation_hue` without a hue step, in closed form: OpenCV's round trip gives each channel
    c -> V - saturation (V - c) V / (|V| + eps) (H and V unchanged; for V < 0 it is not the identity)."""
    v = x.amax(0)
    k = v / (v.abs() + _FLT_EPSILON)
    k *= saturation
    return v - (v - x).mul_(k)


def photometric_distort(x: torch.Tensor, p: Photometric) -> torch.Tensor:
    """mmdetection's PhotoMetricDistortion with the draws `p` on float32 RGB `x` (3, ...), unclipped.

    Every step is per pixel. The HSV round trip is skipped when neither saturation nor hue is
    drawn and no value can be negative: it is then the identity up to rounding (mmdetection runs it
    always; OpenCV's formulas are not the identity for a pixel whose largest value is negative)."""
    x = x.clone()
    if p.brightness is not None:
        x += p.brightness
    if p.contrast is not None and p.contrast_first:
        x *= p.contrast
    if p.hue is not None:
        x = _saturation_hue(x, p.saturation, p.hue)
    elif p.saturation is not None or (p.brightness is not None and p.brightness < 0):
        x = _saturation(x, 1.0 if p.saturation is None else p.saturation)
    if p.contrast is not None and not p.contrast_first:
        x *= p.contrast
    if p.permutation is not None:
        x = x[list(p.permutation)]
    return x


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- the straightforward order


def reference_ssd_augment(
    img: torch.Tensor, boxes: torch.Tensor, draws: SSDDraws, size: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`draws` applied step by step as mmdetection does: (uint8 image, float32 boxes, kept mask).

    The whole image distorted, the whole canvas built, cropped, resized to `size` (if given)."""
    x = photometric_distort(img.float(), draws.photometric)
    out = boxes.to(torch.float64)
    if draws.canvas is not None:
        height, width, top, left = draws.canvas
        canvas = torch.tensor(SSD_MEAN, dtype=torch.float32).view(3, 1, 1).repeat(1, height, width)
        canvas[:, top : top + x.shape[1], left : left + x.shape[2]] = x
        x = canvas
        out = out + torch.tensor([left, top, left, top], dtype=torch.float64)
    keep = torch.ones(len(out), dtype=torch.bool)
    if draws.patch is not None:
        x0, y0, x1, y1 = draws.patch
        patch = torch.tensor([draws.patch], dtype=torch.float64)
        keep = _centres_inside(out, patch)[0]
        out = out[keep]
        out[:, 2:] = torch.minimum(out[:, 2:], patch[:, 2:])
        out[:, :2] = torch.maximum(out[:, :2], patch[:, :2])
        out = out - torch.tensor([x0, y0, x0, y0], dtype=torch.float64)
        x = x[:, y0:y1, x0:x1]
    if size is not None:
        height, width = x.shape[-2:]
        x = torch.nn.functional.interpolate(
            x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=False
        )[0]
        out = out * torch.tensor([size / width, size / height] * 2, dtype=torch.float64)
        out = out.clamp(0, size)
    return _to_uint8(x), out.to(torch.float32), keep


# ---------------------------------------------------------------- what the loader runs

_CHUNK = 1 << 15  # pixels per photometric chunk: its temporaries stay in a core's cache
_PEAKS = (0.0, 2.0, 4.0)  # where red, green and blue peak in the hue hexagon, in 60-degree units


def _permuted_brightened(planes: torch.Tensor, perm: tuple[int, ...], bright: float | None, out: torch.Tensor) -> None:
    """`out` = the uint8 `planes` in the permutation's channel order, plus the brightness: the
    per-channel steps every branch of `_distort_chunk` but the hue one starts with."""
    if perm == (0, 1, 2):
        out.copy_(planes)
    else:
        for j, c in enumerate(perm):
            out[j].copy_(planes[c])
    if bright is not None:
        out.add_(bright)


def _distort_chunk(hwc: torch.Tensor, out: torch.Tensor, p: Photometric) -> None:
    """`photometric_distort` of the uint8 pixels `hwc` (rows, cols, 3) into the float view `out`
    (3, rows, cols), up to float rounding, in few passes that each vectorise.

    The steps folded: brightness and the first contrast are per channel, so V and the minimum
    are the raw ones mapped; the second contrast scales V and S V; the channel permutation picks
    each output channel's input plane (or its hue peak). Hue (in 60-degree units) is found from
    the raw integer values (brightness cancels in it, contrast only moves OpenCV's epsilon), with
    0/1 masks from clamps instead of comparisons; each channel's weight in the hexagon is a
    triangle wave of the shifted hue, |(|H - peak| - 3)| clamped to [1, 2] (minus 1: 0 on the
    channel's peak side, 1 opposite), so no remainder or wrap is needed."""
    bright = p.brightness
    c1 = p.contrast if p.contrast is not None and p.contrast_first else None
    c2 = p.contrast if p.contrast is not None and not p.contrast_first else None
    perm = p.permutation if p.permutation is not None else (0, 1, 2)
    planes = hwc.permute(2, 0, 1)
    if p.hue is None and p.saturation is None and (bright is None or bright >= 0):  # per channel: affine
        _permuted_brightened(planes, perm, bright, out)
        if p.contrast is not None:
            out.mul_(p.contrast)
        return
    if p.hue is None:  # saturation (or the round trip after a negative brightness): per (V, channel)
        _permuted_brightened(planes, perm, bright, out)
        if c1 is not None:
            out.mul_(c1)
        v = out.amax(0)
        k = v.abs().add_(_FLT_EPSILON)
        k = torch.div(v, k).mul_(1.0 if p.saturation is None else p.saturation)
        if c2 is not None:
            k.mul_(c2)
            out.sub_(v).mul_(k).add_(v.mul_(c2))
        else:
            out.sub_(v).mul_(k).add_(v)
        return
    x = torch.empty(out.shape, dtype=torch.float32)
    x.copy_(planes)
    r, g, b = x[0], x[1], x[2]
    v = x.amax(0)
    mn = x.amin(0)
    is_r = torch.sub(r, v).add_(1.0).clamp_(0.0, 1.0)  # 1 where red is the largest (integers)
    is_g = torch.sub(g, v).add_(1.0).clamp_(0.0, 1.0).mul_(torch.sub(1.0, is_r))  # green, not red
    # H = the largest channel's offset (0, 2, 4) + (next - next but one) / (V - min)
    gb = torch.sub(g, b)
    rg = torch.sub(r, g)
    num = torch.sub(gb, rg).mul_(is_r).add_(rg)
    num.addcmul_(is_g, torch.add(gb, rg, alpha=2.0), value=-1.0)  # b - r - (r - g) = -(g - b) - 2 (r - g)
    hue = num.div_(torch.sub(v, mn).add_(_FLT_EPSILON))
    hue.add_(is_r, alpha=-4.0).add_(is_g, alpha=-2.0).add_(4.0 + p.hue / 60.0)
    if bright is not None:
        v.add_(bright)
        mn.add_(bright)
    if c1 is not None:
        v.mul_(c1)
        mn.mul_(c1)
    diff = mn.neg_().add_(v)  # V - min, as mapped
    # S V: the saturation's V / (|V| + eps) is 1 up to rounding unless V can be <= 0
    sv = diff.mul_(1.0 if p.saturation is None else p.saturation)
    if bright is not None and bright < 0:
        sv.mul_(torch.div(v, v.abs().add_(_FLT_EPSILON)))
    if c2 is not None:
        v.mul_(c2)
        sv.mul_(c2)
    base = v.sub_(sv, alpha=2.0)  # out = V - S V w = (V - 2 S V) + S V clamp(|(|H - peak| - 3)|, 1, 2)
    peaks = torch.tensor([_PEAKS[c] for c in perm], dtype=torch.float32).view(3, 1, 1)
    w = torch.sub(hue, peaks, out=x).abs_().sub_(3.0).abs_().clamp_(1.0, 2.0)
    torch.addcmul(base, sv, w, out=out)


def _taps(out_size: int, in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two source indices and weights of each output pixel of torch's bilinear resize
    (align_corners=False, no antialiasing): `upsample_bilinear2d`'s own arithmetic, in float32."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = src.long().clamp_(max=in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = (src - i0).clamp_(0, 1)
    return i0, i1, 1 - w1, w1


def _grid_taps(
    i0: torch.Tensor, i1: torch.Tensor, offset: int, length: int, dense: float
) -> tuple[slice | torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image lines to distort for the taps `i0`, `i1` (patch lines; the image is `offset`
    lines into the patch and `length` long) and the taps as indices into them, those on the
    canvas pointing one past the last. The lines are the distinct ones read, sorted, or the whole
    range between the first and the last when they fill at least `dense` of it (a slice: no
    gather, the few lines not read distorted for nothing)."""
    a0, a1 = i0 + offset, i1 + offset
    lines = torch.unique(torch.cat([a0, a1]))  # sorted
    inside = lines[(lines >= 0) & (lines < length)]
    if not len(inside):
        return inside, torch.zeros_like(a0), torch.zeros_like(a1)
    lo, hi = int(inside[0]), int(inside[-1])
    if len(inside) >= dense * (hi - lo + 1):
        index: slice | torch.Tensor = slice(lo, hi + 1)
        g0, g1, count = a0 - lo, a1 - lo, hi - lo + 1
    else:
        index, count = inside, len(inside)
        g0, g1 = torch.searchsorted(inside, a0), torch.searchsorted(inside, a1)
    g0[(a0 < lo) | (a0 > hi)] = count
    g1[(a1 < lo) | (a1 > hi)] = count
    return index, g0, g1


def ssd_augment(
    img: torch.Tensor, boxes: torch.Tensor, draws: SSDDraws, size: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `reference_ssd_augment` returns, computing only the pixels the resize reads.

    Boxes: one shift and one scale from the image to the output. Pixels: the image rows and
    columns the bilinear resize reads (every patch line when `size` is None) gathered as uint8
    and distorted in cache-sized chunks, one more row and column of the canvas colour for the
    taps that fall on the canvas; then the resize's weighted sums over that grid."""
    height, width = img.shape[-2:]
    canvas_h, canvas_w, top, left = draws.canvas if draws.canvas is not None else (height, width, 0, 0)
    x0, y0, x1, y1 = draws.patch if draws.patch is not None else (0, 0, canvas_w, canvas_h)
    patch_w, patch_h = x1 - x0, y1 - y0

    # boxes: image -> canvas -> patch in one shift, then the resize's scale
    shift = torch.tensor([left - x0, top - y0] * 2, dtype=torch.float64)
    out = boxes.to(torch.float64)
    keep = torch.ones(len(out), dtype=torch.bool)
    if draws.patch is not None:
        on_canvas = out + torch.tensor([left, top] * 2, dtype=torch.float64)
        keep = _centres_inside(on_canvas, torch.tensor([draws.patch], dtype=torch.float64))[0]
        out = out[keep]
    out = out + shift
    out[:, 0::2] = out[:, 0::2].clamp(0, patch_w)
    out[:, 1::2] = out[:, 1::2].clamp(0, patch_h)
    if size is not None:
        out = (out * torch.tensor([size / patch_w, size / patch_h] * 2, dtype=torch.float64)).clamp(0, size)
        ry0, ry1, _, wy1 = _taps(size, patch_h)
        rx0, rx1, _, wx1 = _taps(size, patch_w)
    else:  # every patch line, as it is
        ry0 = ry1 = torch.arange(patch_h)
        rx0 = rx1 = torch.arange(patch_w)
        wy1, wx1 = torch.zeros(patch_h), torch.zeros(patch_w)

    # pixels: the image lines the resize reads, distorted, plus one canvas row and column
    rows, gy0, gy1 = _grid_taps(ry0, ry1, y0 - top, height, dense=1.0)  # a row gather is a copy
    cols, gx0, gx1 = _grid_taps(rx0, rx1, x0 - left, width, dense=0.5)  # a column gather is slower
    n_rows = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
    n_cols = cols.stop - cols.start if isinstance(cols, slice) else len(cols)
    grid = torch.empty(3, n_rows + 1, n_cols + 1)
    mean = torch.tensor(SSD_MEAN, dtype=torch.float32).view(3, 1)
    grid[:, n_rows] = mean
    grid[:, :, n_cols] = mean
    if n_rows and n_cols:
        hwc = img.permute(1, 2, 0)  # a decoded image's memory order: pixel by pixel
        step = max(1, _CHUNK // n_cols)
        for start in range(0, n_rows, step):
            stop = min(start + step, n_rows)
            if isinstance(rows, slice):
                chunk = hwc.narrow(0, rows.start + start, stop - start)
            else:
                chunk = hwc.index_select(0, rows[start:stop])
            chunk = chunk.narrow(1, cols.start, n_cols) if isinstance(cols, slice) else chunk.index_select(1, cols)
            _distort_chunk(chunk, grid[:, start:stop, :n_cols], draws.photometric)
    # the resize's weighted sums over the grid (as lerps): along y, then along x on the transposed
    # result, so that both gather whole rows
    along_y = grid.index_select(1, gy0).lerp_(grid.index_select(1, gy1), wy1[:, None])
    along_y = along_y.transpose(1, 2).contiguous()
    x = along_y.index_select(1, gx0).lerp_(along_y.index_select(1, gx1), wx1[:, None])
    return _to_uint8(x).transpose(1, 2).contiguous(), out.to(torch.float32), keep
