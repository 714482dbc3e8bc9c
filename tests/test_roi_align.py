"""RoIAlign against an independent, deliberately naive per-box / per-bin / per-point implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfalign.vision.roi_align import pool_regions, roi_align


def _bilinear(fmap: np.ndarray, y: float, x: float) -> np.ndarray:
    """Value of ``fmap [C, H, W]`` at (y, x): zero outside [-1, H] x [-1, W], clamped onto the border band."""
    _, h, w = fmap.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(fmap.shape[0])
    y = max(y, 0.0)
    x = max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    return hy * hx * fmap[:, y0, x0] + hy * lx * fmap[:, y0, x1] + ly * hx * fmap[:, y1, x0] + ly * lx * fmap[:, y1, x1]


def naive_roi_align(features, boxes, batch_index, scale, out=(2, 2), sampling_ratio=2, aligned=True) -> np.ndarray:
    feats = features.double().numpy()
    c = feats.shape[1]
    oh, ow = out
    result = np.zeros((len(boxes), c, oh, ow))
    offset = 0.5 if aligned else 0.0
    for k, (bx1, by1, bx2, by2) in enumerate(boxes.double().tolist()):
        fmap = feats[int(batch_index[k])]
        sx, sy = bx1 * scale - offset, by1 * scale - offset
        rw, rh = bx2 * scale - offset - sx, by2 * scale - offset - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bin_h, bin_w = rh / oh, rw / ow
        gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(rh / oh))
        gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(rw / ow))
        count = max(gh * gw, 1)
        for i in range(oh):
            for j in range(ow):
                total = np.zeros(c)
                for iy in range(gh):
                    y = sy + i * bin_h + (iy + 0.5) * bin_h / gh
                    for ix in range(gw):
                        x = sx + j * bin_w + (ix + 0.5) * bin_w / gw
                        total += _bilinear(fmap, y, x)
                result[k, :, i, j] = total / count
    return result


def _random_boxes(gen: torch.Generator, k: int, size: float) -> torch.Tensor:
    # include boxes reaching past the image and degenerate ones, where the edge rules matter
    xy = torch.rand(k, 2, generator=gen) * size * 1.2 - 0.1 * size
    wh = torch.rand(k, 2, generator=gen) * size * 0.8
    wh[0] = 0.0
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize(
    "out,sampling_ratio,aligned",
    [((2, 2), 2, True), ((3, 2), 1, True), ((2, 3), 3, False), ((2, 2), 0, True), ((1, 1), -1, False)],
)
def test_matches_naive(out, sampling_ratio, aligned):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 5, 6, 7, generator=gen, dtype=torch.float64)
    boxes = _random_boxes(gen, 12, 7 * 32.0)
    batch_index = torch.randint(0, 3, (12,), generator=gen)
    got = roi_align(features, boxes, batch_index, 1 / 32, out, sampling_ratio, aligned)
    want = naive_roi_align(features, boxes, batch_index, 1 / 32, out, sampling_ratio, aligned)
    assert got.shape == (12, 5, *out)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_whole_map_box_of_constant_map_and_pool_regions():
    features = torch.full((1, 4, 7, 7), 3.0)
    box = torch.tensor([[0.0, 0.0, 224.0, 224.0]])
    pooled = pool_regions(features, box, torch.tensor([0]), 1 / 32)
    assert pooled.shape == (1, 4)
    torch.testing.assert_close(pooled, torch.full((1, 4), 3.0))


def test_box_far_outside_is_zero_and_empty_input():
    features = torch.randn(1, 2, 4, 4)
    far = torch.tensor([[1000.0, 1000.0, 1100.0, 1100.0]])
    assert torch.count_nonzero(roi_align(features, far, torch.tensor([0]), 1 / 32)) == 0
    empty = roi_align(features, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 1 / 32, (2, 2))
    assert empty.shape == (0, 2, 2, 2)


def test_float32_and_gradients():
    features = torch.randn(2, 3, 5, 5, requires_grad=True)
    boxes = torch.tensor([[10.0, 20.0, 100.0, 150.0], [0.0, 0.0, 50.0, 60.0]])
    out = pool_regions(features, boxes, torch.tensor([1, 0]), 1 / 32)
    out.sum().backward()
    assert features.grad is not None and features.grad[0].abs().sum() > 0 and features.grad[1].abs().sum() > 0
    want = naive_roi_align(features.detach(), boxes, torch.tensor([1, 0]), 1 / 32).mean(axis=(2, 3))
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-5, atol=1e-6)


def test_bad_batch_index():
    features = torch.randn(2, 3, 4, 4)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match="0..1"):
        roi_align(features, boxes, torch.tensor([2]), 1 / 32)
    with pytest.raises(ValueError, match="batch_index must be"):
        roi_align(features, boxes, torch.tensor([0, 1]), 1 / 32)
