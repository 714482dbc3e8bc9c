"""Batches from a feature store: region dropout and the choice between an image and its mirrored copy."""

from __future__ import annotations

import numpy as np
import torch

from selfalign.data.batches import RegionStore, view_masks, view_regions


def _store(n: int, width: int, value: float, counts: list[int]) -> RegionStore:
    feats = np.zeros((n, width, 3), np.float16)
    mask = np.zeros((n, width), bool)
    for i, c in enumerate(counts):
        feats[i, :c] = value + i
        mask[i, :c] = True
    return RegionStore(feats, mask)


def test_views_take_each_image_from_the_chosen_copy_padded_to_the_wider():
    store = _store(4, 2, 10.0, [2, 1, 2, 1])
    mirror = _store(4, 3, 20.0, [3, 3, 1, 2])  # a detector may find other boxes on the mirrored image
    idx = np.array([0, 1, 2, 3, 1])
    flip = torch.tensor([False, True, False, True, False])
    regions = view_regions(store, mirror, idx, flip)
    masks = view_masks(store, mirror, idx, flip)
    assert regions.shape == (5, 3, 3) and masks.shape == (5, 3)
    assert regions[:, 0, 0].tolist() == [10.0, 21.0, 12.0, 23.0, 11.0]
    assert masks.sum(1).tolist() == [2, 3, 2, 2, 1]
    assert not regions[0, 2].any() and not masks[0, 2]  # padding of the narrower store
    # nothing flipped (or no mirror): the store's own rows, widened only when a mirror exists
    none = torch.zeros(5, dtype=torch.bool)
    assert torch.equal(view_regions(store, mirror, idx, none)[:, :2], store.get(idx)[0])
    assert torch.equal(view_regions(store, None, idx, None), store.get(idx)[0])
    assert torch.equal(view_masks(store, None, idx, None), store.mask[torch.from_numpy(idx)])
