"""Batches of region features and captions from a feature store split, for training and encoding."""

from __future__ import annotations

import numpy as np
import torch

IN_MEMORY_LIMIT_BYTES = 4 << 30  # smaller stores are read into RAM once; larger ones stay memory-mapped


class RegionStore:
    """Random access to a split's region features: ``get(indices) -> (regions [B, R, D] float32, mask [B, R])``."""

    def __init__(self, images: np.ndarray, region_mask: np.ndarray, pin_memory: bool = False):
        self.in_memory = images.nbytes <= IN_MEMORY_LIMIT_BYTES
        self.images = torch.from_numpy(np.array(images)) if self.in_memory else images
        self.mask = torch.from_numpy(np.ascontiguousarray(region_mask, dtype=bool))
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.mask)

    def get(self, indices: np.ndarray, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices)
        if self.in_memory:
            regions = self.images[torch.from_numpy(idx)]
        else:
            order = np.argsort(idx)  # sorted reads are much faster on a memory map
            rows = np.asarray(self.images[idx[order]])
            regions = torch.from_numpy(rows[np.argsort(order)])
        mask = self.mask[torch.from_numpy(idx)]
        if self.pin_memory:
            regions = regions.pin_memory()
        non_blocking = self.pin_memory
        return regions.to(device, non_blocking=non_blocking).float(), mask.to(device, non_blocking=non_blocking)


def drop_regions(mask: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """VSE∞'s size augmentation: hide a random ``fraction`` of each image's valid regions (keeping at least one).

    ``mask [B, R]`` -> new mask ``[B, R]``.
    """
    if fraction <= 0:
        return mask
    keep = torch.rand(mask.shape, generator=generator, device="cpu").to(mask.device) >= fraction
    new = mask & keep
    empty = new.sum(1) == 0
    if empty.any():  # restore the first valid region of images that lost all of them
        first = mask.float().argmax(1)
        new[empty, first[empty]] = True
    return new


def epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The shuffled batches of one epoch, a pure function of (seed, epoch) so that a resumed run sees the same."""
    order = np.random.default_rng([seed, epoch]).permutation(n_items)
    n_full = n_items // batch_size
    batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(n_full)]
    if n_items % batch_size >= 2:  # a one-pair batch has no negative
        batches.append(order[n_full * batch_size:])
    return batches
