"""Shared by the align modules: shape checks (wrong shapes raise InputError naming the argument) and the selection
of valid locals."""

from __future__ import annotations

import torch

from selfalign.errors import InputError


def check_locals(name: str, feats: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> None:
    """``feats`` must be ``[B, L, d]`` (d = ``dim`` when given) and ``mask`` the matching ``[B, L]``."""
    if feats.dim() != 3:
        raise InputError(f"{name}: expected locals of shape [B, L, d], got {tuple(feats.shape)}")
    if dim is not None and feats.shape[-1] != dim:
        raise InputError(f"{name}: feature width {feats.shape[-1]} does not match the module's dim {dim}")
    if tuple(mask.shape) != tuple(feats.shape[:2]):
        raise InputError(f"{name}_mask: expected shape {tuple(feats.shape[:2])}, got {tuple(mask.shape)}")


def check_same_batch(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    """Paired inputs must share the batch size (element i of one is paired with element i of the other)."""
    if a.shape[0] != b.shape[0]:
        raise InputError(f"{a_name} has batch size {a.shape[0]} but {b_name} has {b.shape[0]}; pairs must align")


def valid_locals(feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Valid locals of ``feats [B, L, d]`` under ``mask [B, L]`` (bool): ``(valid [N, d], flat [N], pair_of [N])``.

    ``flat`` are the positions' row-major indices into ``[B * L]``, ``pair_of`` their batch rows. Selections go
    through ``index_select``, not advanced indexing: on CPU the backward of advanced indexing is an accumulating
    ``index_put_`` that sorts its indices, several milliseconds per training step.
    """
    flat = mask.reshape(-1).nonzero().squeeze(1)
    pair_of = torch.div(flat, mask.shape[1], rounding_mode="floor")
    return feats.reshape(-1, feats.shape[-1]).index_select(0, flat), flat, pair_of
