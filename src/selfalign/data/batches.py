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

    @classmethod
    def from_counts(cls, images: np.ndarray, n_regions: np.ndarray) -> "RegionStore":
        """A store of ``images [N, R, D]`` whose first ``n_regions [N]`` regions are valid."""
        return cls(images, np.arange(images.shape[1])[None, :] < np.asarray(n_regions)[:, None])

    def __len__(self) -> int:
        return len(self.mask)

    @property
    def width(self) -> int:
        """R, the padded number of regions per image."""
        return int(self.mask.shape[1])

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


def _widen(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad dim 1 (regions) of ``[B, R, ...]`` to ``width``."""
    pad = [0, 0] * (x.dim() - 2) + [0, width - x.shape[1]]
    return torch.nn.functional.pad(x, pad) if width > x.shape[1] else x


def view_masks(store: RegionStore, mirror: RegionStore | None, indices: np.ndarray,
               flip: torch.Tensor | None) -> torch.Tensor:
    """Region masks ``[B, R]`` of images ``indices``, from the mirrored copy where ``flip [B]`` is True (CPU)."""
    idx = torch.from_numpy(np.asarray(indices))
    if mirror is None or flip is None:
        return store.mask[idx]
    width = max(store.width, mirror.width)
    return torch.where(flip[:, None], _widen(mirror.mask[idx], width), _widen(store.mask[idx], width))


def view_regions(store: RegionStore, mirror: RegionStore | None, indices: np.ndarray, flip: torch.Tensor | None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Regions ``[B, R, D]`` of images ``indices``, each from the mirrored copy where ``flip [B]`` is True."""
    if mirror is None or flip is None:
        return store.get(indices, device)[0]
    idx, chosen = np.asarray(indices), flip.cpu().numpy()
    width = max(store.width, mirror.width)
    parts = [(np.flatnonzero(~chosen), store), (np.flatnonzero(chosen), mirror)]
    out = None
    for rows, source in parts:
        if len(rows):
            regions = _widen(source.get(idx[rows], device)[0], width)
            if out is None:
                out = regions.new_zeros((len(idx), width, regions.shape[-1]))
            out[torch.from_numpy(rows).to(out.device)] = regions
    return out


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
