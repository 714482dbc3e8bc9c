"""The VSE++ hinge triplet loss on a batch of matched (image, caption) pairs.

A caption of the same image as the anchor (a sibling) is never counted as a negative: with five captions per image
two siblings often share a batch, and the hardest-negative loss would otherwise push apart a true match.
"""

from __future__ import annotations

import torch


def hinge_triplet_loss(sims: torch.Tensor, image_ids: torch.Tensor, margin: float = 0.2,
                       hardest: bool = True, column_ids: torch.Tensor | None = None,
                       row_offset: int = 0) -> torch.Tensor:
    """Summed VSE++ loss for ``sims [B, B']`` (row i = image of pair i, column j = caption of pair j).

    Positives sit at ``(i, row_offset + i)``. ``image_ids [B]`` (and ``column_ids [B']``, default the same) name the
    image of each pair; pairs of the same image are masked out as negatives. ``hardest`` uses the hardest negative
    (VSE++ max violation), else the sum over all negatives (VSE∞'s warm-up).
    """
    column_ids = image_ids if column_ids is None else column_ids
    rows = torch.arange(sims.shape[0], device=sims.device)
    positive = sims[rows, rows + row_offset]
    same_image = image_ids.unsqueeze(1) == column_ids.unsqueeze(0)  # [B, B']: never negatives
    # Caption retrieval (image anchor, row i) and image retrieval (caption anchor, column j): the column side is
    # only defined for the local rows' own captions, i.e. the square block starting at row_offset.
    cost_caption = (margin + sims - positive.unsqueeze(1)).clamp(min=0).masked_fill(same_image, 0.0)
    block = sims[:, row_offset: row_offset + sims.shape[0]]
    block_same = same_image[:, row_offset: row_offset + sims.shape[0]]
    cost_image = (margin + block - positive.unsqueeze(0)).clamp(min=0).masked_fill(block_same, 0.0)
    if hardest:
        return cost_caption.max(1).values.sum() + cost_image.max(0).values.sum()
    return cost_caption.sum() + cost_image.sum()
