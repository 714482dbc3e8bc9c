"""The VSE++ hinge triplet loss on a batch of matched (image, caption) pairs.

A caption of the same image as the anchor (a sibling) is never counted as a negative: with five captions per image
two siblings often share a batch, and the hardest-negative loss would otherwise push apart a true match.
"""

from __future__ import annotations

import torch


def hinge_triplet_loss(sims: torch.Tensor, image_ids: torch.Tensor, margin: float = 0.2,
                       hardest: bool = True, anchors: slice | None = None) -> torch.Tensor:
    """Summed VSE++ loss for ``sims [B, B]`` (row i = image of pair i, column j = caption of pair j; positives on
    the diagonal). ``image_ids [B]`` names the image of each pair; pairs of the same image are never negatives.

    ``hardest`` uses the hardest negative (VSE++ max violation), else the sum over all negatives (VSE∞'s warm-up).
    ``anchors`` restricts the sum to the pairs ``anchors`` as anchors (their image row for caption retrieval, their
    caption column for image retrieval): over disjoint slices covering the batch the parts add up to the full loss,
    which is how each distributed rank takes its share of the loss on the gathered batch.
    """
    anchors = slice(0, sims.shape[0]) if anchors is None else anchors
    diagonal = sims.diagonal()
    same_image = image_ids.unsqueeze(1) == image_ids.unsqueeze(0)  # [B, B]: never negatives
    # caption retrieval: the anchor image's row against every caption of the batch
    rows = sims[anchors]
    cost_caption = (margin + rows - diagonal[anchors].unsqueeze(1)).clamp(min=0).masked_fill(same_image[anchors], 0.0)
    # image retrieval: the anchor caption's column against every image of the batch
    cols = sims[:, anchors]
    cost_image = (margin + cols - diagonal[anchors].unsqueeze(0)).clamp(min=0).masked_fill(same_image[:, anchors], 0.0)
    if hardest:
        return cost_caption.max(1).values.sum() + cost_image.max(0).values.sum()
    return cost_caption.sum() + cost_image.sum()
