"""Losses on the similarities of a batch of matched (image, caption) pairs: the VSE++ hinge triplet loss, and the
distillation of a teacher's similarities.

A caption of the same image as the anchor (a sibling) is never counted as a negative by the hinge loss: with five
captions per image two siblings often share a batch, and the hardest-negative loss would otherwise push apart a true
match. Distillation has no negatives to choose: the teacher's similarities say how alike every pair is.
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


def distillation_loss(sims: torch.Tensor, teacher_sims: torch.Tensor, temperature: float,
                      anchors: slice | None = None) -> torch.Tensor:
    """Summed KL divergence from the teacher's to the student's in-batch retrieval distributions.

    ``sims [B, B]`` are the student's similarities, ``teacher_sims [B, B]`` the teacher's for the same pairs (row i =
    image of pair i, column j = caption of pair j). Each anchor image's row and each anchor caption's column becomes a
    distribution by ``softmax(s / temperature)``; the loss is ``sum KL(teacher || student)`` over both, so the student
    learns how much more alike the teacher finds every pair, not only which one matches. ``anchors`` splits the sum
    across distributed ranks exactly as in :func:`hinge_triplet_loss`.
    """
    anchors = slice(0, sims.shape[0]) if anchors is None else anchors
    teacher_sims = teacher_sims.to(sims.dtype)

    def kl(student: torch.Tensor, teacher: torch.Tensor, dim: int) -> torch.Tensor:
        target = torch.log_softmax(teacher / temperature, dim=dim)
        return (target.exp() * (target - torch.log_softmax(student / temperature, dim=dim))).sum()

    return kl(sims[anchors], teacher_sims[anchors], 1) + kl(sims[:, anchors], teacher_sims[:, anchors], 0)
