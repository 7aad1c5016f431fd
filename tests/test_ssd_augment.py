"""SSD's augmentation (`pisa.data.ssd_augment`): the loader's transform against the step-by-step
one on the same draws, the photometric steps against OpenCV's formulas, and mmdetection's draw
semantics (additive brightness, the crop that every box must reach)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from pisa.data.ssd_augment import (
    Photometric,
    SSDDraws,
    _saturation,
    _saturation_hue,
    draw_ssd,
    photometric_distort,
    reference_ssd_augment,
    ssd_augment,
)

BOXES = torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 20.0, 150.0, 110.0], [3.5, 80.2, 30.1, 118.0]])


def _image(height: int = 120, width: int = 160, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [300, 48, None])
def test_the_loaders_transform_gives_the_reference_boxes_and_pixels(size: int | None) -> None:
    """Same draws: the same kept boxes at the same place; pixels apart by float rounding only."""
    img = _image()
    differing = total = 0
    kinds = set()
    for seed in range(60):
        torch.manual_seed(seed)
        draws = draw_ssd(120, 160, BOXES)
        kinds.add((draws.canvas is not None, draws.patch is not None))
        ref_img, ref_boxes, ref_keep = reference_ssd_augment(img, BOXES, draws, size)
        img_out, boxes, keep = ssd_augment(img, BOXES, draws, size)
        assert torch.equal(keep, ref_keep), seed
        torch.testing.assert_close(boxes, ref_boxes, atol=1e-4, rtol=0)
        assert img_out.shape == ref_img.shape and img_out.dtype == torch.uint8
        gap = (img_out.int() - ref_img.int()).abs()
        assert int(gap.max()) <= 1, seed
        differing += int((gap > 0).sum())
        total += gap.numel()
    assert differing / total < 1e-3
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}  # every path taken


def _opencv_hsv_round_trip(x: torch.Tensor, saturation: float, hue: float) -> torch.Tensor:
    """OpenCV's RGB2HSV_f and HSV2RGB_f, transcribed pixel by pixel, with mmdetection's steps."""
    eps = 1.1920929e-07
    sectors = [[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]]  # b, g, r
    out = torch.empty_like(x)
    for i in range(x.shape[1]):
        r, g, b = (float(c) for c in x[:, i])
        v = max(r, g, b)
        diff = v - min(r, g, b)
        s = diff / (abs(v) + eps)
        scale = 60.0 / (diff + eps)
        h = (g - b) * scale if v == r else (b - r) * scale + 120.0 if v == g else (r - g) * scale + 240.0
        h = h + 360.0 if h < 0 else h
        s *= saturation
        h += hue
        h = h - 360 if h > 360 else h + 360 if h < 0 else h
        h *= 6.0 / 360.0
        while h < 0:
            h += 6
        while h >= 6:
            h -= 6
        sector = int(h // 1)
        h -= sector
        tab = [v, v * (1 - s), v * (1 - s * h), v * (1 - s * (1 - h))]
        bi, gi, ri = sectors[sector]
        out[:, i] = torch.tensor([tab[ri], tab[gi], tab[bi]])
    return out


def test_saturation_and_hue_follow_opencvs_formulas() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 400, generator=g) * 320 - 40  # beyond [0, 255] both ways, as brightness leaves it
    x[:, :20] = torch.tensor([200.0, 200.0, 10.0]).view(3, 1)  # ties between the largest channels
    x[:, 20:30] = 77.0  # grey
    for saturation, hue in [(1.0, 0.0), (0.6, 12.5), (1.4, -17.0)]:
        expected = _opencv_hsv_round_trip(x, saturation, hue)
        torch.testing.assert_close(_saturation_hue(x, saturation, hue), expected, atol=2e-3, rtol=0)
        if hue == 0.0:
            torch.testing.assert_close(_saturation(x, saturation), expected, atol=2e-3, rtol=0)


def test_photometric_steps_by_hand() -> None:
    pixel = torch.tensor([200.0, 100.0, 50.0]).view(3, 1)
    out = photometric_distort(pixel, Photometric(brightness=-30.0))  # additive, not a factor
    torch.testing.assert_close(out, torch.tensor([[170.0], [70.0], [20.0]]), atol=1e-3, rtol=0)
    out = photometric_distort(pixel, Photometric(contrast=1.5, contrast_first=True))  # a product, unclipped
    torch.testing.assert_close(out, torch.tensor([[300.0], [150.0], [75.0]]), atol=1e-3, rtol=0)
    red = torch.tensor([255.0, 0.0, 0.0]).view(3, 1)
    yellowish = photometric_distort(red, Photometric(hue=18.0))  # 18 degrees towards green
    torch.testing.assert_close(yellowish, torch.tensor([[255.0], [76.5], [0.0]]), atol=1e-2, rtol=0)
    grey = torch.full((3, 1), 90.0)
    torch.testing.assert_close(photometric_distort(grey, Photometric(saturation=1.5)), grey, atol=1e-3, rtol=0)
    swapped = photometric_distort(pixel, Photometric(permutation=(2, 0, 1)))
    assert swapped.flatten().tolist() == [50.0, 200.0, 100.0]


def _crop_share(boxes: torch.Tensor, draws: int = 200) -> float:
    crops = 0
    for seed in range(draws):
        torch.manual_seed(seed)
        crops += draw_ssd(200, 200, boxes).patch is not None
    return crops / draws


def test_a_crop_must_reach_the_iou_with_every_box() -> None:
    """mmdetection's MinIoURandomCrop: with a 4x4 box beside a large one no patch of >= 0.3 of the
    side reaches IoU 0.1 with it, so only the 'any patch' mode crops: the draw ends in it or in
    'no crop', 1/2 each. (With one box enough, as torchvision's RandomIoUCrop, most modes could.)"""
    large = torch.tensor([[20.0, 20.0, 180.0, 180.0]])
    assert _crop_share(large) > 0.8
    with_tiny = torch.tensor([[20.0, 20.0, 180.0, 180.0], [100.0, 100.0, 104.0, 104.0]])
    assert 0.4 < _crop_share(with_tiny) < 0.6
    for seed in range(60):
        torch.manual_seed(seed)
        draws = draw_ssd(200, 200, large)
        if draws.patch is not None and draws.canvas is None:
            x0, y0, x1, y1 = draws.patch
            assert 0.5 <= (y1 - y0) / (x1 - x0) <= 2 and min(x1 - x0, y1 - y0) >= 0.3 * 200 - 1
            iou = box_iou(torch.tensor([draws.patch], dtype=torch.float32), large)
            assert float(iou.min()) >= 0.0 and float(iou.max()) > 0


def test_draw_frequencies_and_ranges() -> None:
    counts = {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0, "permutation": 0, "canvas": 0}
    for seed in range(300):
        torch.manual_seed(seed)
        draws: SSDDraws = draw_ssd(100, 150, BOXES)
        p = draws.photometric
        for key in ("brightness", "contrast", "saturation", "hue", "permutation"):
            counts[key] += getattr(p, key) is not None
        assert p.brightness is None or -32 <= p.brightness <= 32
        assert p.contrast is None or 0.5 <= p.contrast <= 1.5
        assert p.hue is None or -18 <= p.hue <= 18
        if draws.canvas is not None:
            counts["canvas"] += 1
            height, width, top, left = draws.canvas
            assert 100 <= height <= 400 and 150 <= width <= 600
            assert 0 <= top <= height - 100 and 0 <= left <= width - 150
    assert all(105 < n < 195 for n in counts.values()), counts  # each with probability 1/2
