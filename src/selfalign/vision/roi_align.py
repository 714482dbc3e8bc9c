"""RoIAlign without torchvision: average bilinear samples inside each output bin.

Semantics follow the usual RoIAlign (Mask R-CNN; torchvision's ``roi_align``): box corners are scaled by
``spatial_scale`` (and shifted by -0.5 when ``aligned``), each box is split into ``oh x ow`` bins, each bin is sampled on
a regular ``g x g`` grid of points, a point outside ``[-1, H] x [-1, W]`` contributes zero and points in the border
band are clamped onto the edge.

Bilinear interpolation is separable, and so is the out-of-range test, so the average over a bin's sample points is
``sum_{h,w} wy[h] * f[h, w] * wx[w]`` with 1-D weight vectors ``wy``/``wx`` averaged over the sample rows/columns.
That turns the operation into one small matrix product per image instead of a gather per sample point.
"""

from __future__ import annotations

import torch


def _axis_weights(
    start: torch.Tensor, length: torch.Tensor, bins: int, size: int, sampling_ratio: int
) -> torch.Tensor:
    """Interpolation weights ``[K, bins, size]`` along one axis, averaged over each bin's sample points.

    ``start``/``length``: ``[K]`` box start and extent in feature-map units (already shifted for ``aligned``).
    """
    k = start.shape[0]
    dtype, device = start.dtype, start.device
    bin_size = length / bins  # [K]
    if sampling_ratio > 0:
        grid = torch.full((k,), sampling_ratio, dtype=torch.long, device=device)
    else:  # adaptive: about one sample per feature-map cell, per box
        grid = torch.ceil(length / bins).clamp(min=0).long()
    g_max = max(int(grid.max().item()) if k else 1, 1)
    steps = torch.arange(g_max, dtype=dtype, device=device)  # [G]
    bin_ids = torch.arange(bins, dtype=dtype, device=device)  # [bins]
    g = grid.clamp(min=1).to(dtype)
    # sample coordinate of point s in bin b: start + b * bin + (s + 0.5) * bin / g
    coord = (
        start[:, None, None]
        + bin_ids[None, :, None] * bin_size[:, None, None]
        + (steps[None, None, :] + 0.5) * (bin_size / g)[:, None, None]
    )  # [K, bins, G]
    used = (steps[None, :] < grid[:, None]).to(dtype)  # [K, G]: adaptive grids use fewer points on small boxes

    inside = ((coord >= -1.0) & (coord <= size)).to(dtype)
    c = coord.clamp(min=0.0)
    low = torch.floor(c).long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(c), c - low.to(dtype))

    scale = inside * used[:, None, :]  # [K, bins, G]
    weights = torch.zeros(k, bins, g_max, size, dtype=dtype, device=device)
    weights.scatter_add_(3, low.unsqueeze(-1), ((1.0 - frac) * scale).unsqueeze(-1))
    weights.scatter_add_(3, high.unsqueeze(-1), (frac * scale).unsqueeze(-1))
    # count = max(g, 1) per box: a box with an empty adaptive grid averages nothing and gives zeros
    return weights.sum(dim=2) / g[:, None, None]


def roi_align(
    features: torch.Tensor,
    boxes: torch.Tensor,
    batch_index: torch.Tensor,
    spatial_scale: float,
    output_size: tuple[int, int] = (2, 2),
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> torch.Tensor:
    """Pool ``[K, 4]`` boxes (x1, y1, x2, y2 in input-image pixels) from ``features [B, C, H, W]`` -> ``[K, C, oh, ow]``.

    ``batch_index [K]`` says which image of the batch each box belongs to; ``spatial_scale`` maps input pixels to
    feature-map cells (e.g. 1/32); ``sampling_ratio <= 0`` picks ``ceil(box extent / bins)`` points per bin and box.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be [B, C, H, W], got shape {tuple(features.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [K, 4], got shape {tuple(boxes.shape)}")
    oh, ow = output_size
    _, c, h, w = features.shape
    k = boxes.shape[0]
    if batch_index.shape != (k,):
        raise ValueError(f"batch_index must be [K] = [{k}], got shape {tuple(batch_index.shape)}")
    if k and (int(batch_index.min()) < 0 or int(batch_index.max()) >= features.shape[0]):
        raise ValueError(f"batch_index values must lie in 0..{features.shape[0] - 1}")
    if k == 0:
        return features.new_zeros(0, c, oh, ow)
    boxes = boxes.to(features.dtype)
    offset = 0.5 if aligned else 0.0
    x1 = boxes[:, 0] * spatial_scale - offset
    y1 = boxes[:, 1] * spatial_scale - offset
    bw = boxes[:, 2] * spatial_scale - offset - x1
    bh = boxes[:, 3] * spatial_scale - offset - y1
    if not aligned:  # the legacy variant forces boxes to span at least one cell
        bw = bw.clamp(min=1.0)
        bh = bh.clamp(min=1.0)
    wy = _axis_weights(y1, bh, oh, h, sampling_ratio)  # [K, oh, H]
    wx = _axis_weights(x1, bw, ow, w, sampling_ratio)  # [K, ow, W]
    # one [bins, H*W] matrix per box; boxes of the same image then pool with a single matmul
    bins = (wy[:, :, None, :, None] * wx[:, None, :, None, :]).reshape(k, oh * ow, h * w)
    flat = features.flatten(2)  # [B, C, H*W]
    batch_index = batch_index.long()
    order = torch.argsort(batch_index, stable=True)
    counts = torch.bincount(batch_index, minlength=features.shape[0]).tolist()
    parts = [
        (flat[b] @ bins[sel].reshape(-1, h * w).T).reshape(c, len(sel), oh * ow).transpose(0, 1)
        for b, sel in enumerate(torch.split(order, counts))
        if len(sel)
    ]
    pooled = torch.empty(k, c, oh * ow, dtype=features.dtype, device=features.device)
    pooled = pooled.index_copy(0, order, torch.cat(parts))
    return pooled.reshape(k, c, oh, ow)


def pool_regions(
    features: torch.Tensor,
    boxes: torch.Tensor,
    batch_index: torch.Tensor,
    spatial_scale: float,
    output_size: tuple[int, int] = (2, 2),
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> torch.Tensor:
    """One vector per box: :func:`roi_align` averaged over its output bins -> ``[K, C]``."""
    pooled = roi_align(features, boxes, batch_index, spatial_scale, output_size, sampling_ratio, aligned)
    return pooled.mean(dim=(2, 3))
