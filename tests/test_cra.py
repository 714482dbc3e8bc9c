"""CRA NCE: equals the closed form computed with loops; hard-negative selection; padding; degenerate batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfalign.align.cra import cra_loss
from selfalign.errors import InputError


def hardest_negatives(query, keys, mask, b, temperature, num_negatives):
    """The `num_negatives` highest scaled scores of query b against the valid locals of the other pairs."""
    batch, length, _ = keys.shape
    scores = (float(query[b] @ keys[c, j]) / temperature for c in range(batch) if c != b for j in range(length) if mask[c, j])
    return sorted(scores, reverse=True)[:num_negatives]


def reference_nce(query, keys, mask, temperature, num_negatives):
    """method.md §1.4 written out: one positive at a time, top-n negatives of the other pairs per query."""
    terms = []
    batch, length, _ = keys.shape
    for b in range(batch):
        negatives = hardest_negatives(query, keys, mask, b, temperature, num_negatives)
        for i in range(length):
            if not mask[b, i]:
                continue
            pos = float(query[b] @ keys[b, i]) / temperature
            terms.append(-math.log(math.exp(pos) / (math.exp(pos) + sum(math.exp(n) for n in negatives))))
    return sum(terms) / len(terms)


def full_infonce(query, keys, mask, temperature):
    """InfoNCE with every valid local of every other pair in the denominator (vectorised differently)."""
    scores = torch.einsum("bd,cld->bcl", query.double(), keys.double()) / temperature
    batch = query.shape[0]
    losses = []
    for b in range(batch):
        others = torch.cat([scores[b, c][mask[c]] for c in range(batch) if c != b])
        pos = scores[b, b][mask[b]]
        losses.append(-(pos - torch.logaddexp(pos, torch.logsumexp(others, 0))))
    return torch.cat(losses).mean()


def make(seed: int, batch=6, length=5, dim=8):
    gen = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    keys = F.normalize(torch.randn(batch, length, dim, generator=gen), dim=-1)
    mask = torch.rand(batch, length, generator=gen) > 0.35
    mask[:, 0] = True
    return query, keys, mask


@pytest.mark.parametrize("num_negatives", [1, 4, 11])
@pytest.mark.parametrize("temperature", [0.7, 0.2])
def test_matches_loop_reference(num_negatives: int, temperature: float) -> None:
    query, keys, mask = make(num_negatives)
    got = cra_loss(query, keys, mask, temperature, num_negatives)
    want = reference_nce(query, keys, mask, temperature, num_negatives)
    assert abs(float(got) - want) < 1e-5 * max(1.0, want)


def test_enough_negatives_equals_full_infonce() -> None:
    query, keys, mask = make(3)
    want = full_infonce(query, keys, mask, 0.7)
    for n in (int(mask.sum()), 512):
        torch.testing.assert_close(cra_loss(query, keys, mask, 0.7, n).double(), want, rtol=1e-5, atol=1e-6)


def test_zero_negatives_gives_zero() -> None:
    query, keys, mask = make(4)
    assert float(cra_loss(query, keys, mask, 0.7, 0)) == 0.0


def test_gradients_match_autograd_of_the_formula() -> None:
    query, keys, mask = make(5)
    q1, k1 = query.clone().requires_grad_(True), keys.clone().requires_grad_(True)
    cra_loss(q1, k1, mask, 0.7, 512).backward()
    q2, k2 = query.double().requires_grad_(True), keys.double().requires_grad_(True)
    full_infonce(q2, k2, mask, 0.7).backward()
    torch.testing.assert_close(q1.grad.double(), q2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(k1.grad.double(), k2.grad, rtol=1e-4, atol=1e-6)
    assert float(k1.grad[~mask].abs().max()) == 0.0


def topk_nce(query, keys, mask, temperature, num_negatives):
    """The hard-negative NCE with torch.topk picking the negatives (autograd through the picked values)."""
    batch = query.shape[0]
    scores = torch.einsum("bd,cld->bcl", query, keys) / temperature
    others = ~torch.eye(batch, dtype=torch.bool).unsqueeze(-1) & mask.unsqueeze(0)
    neg = scores.masked_fill(~others, float("-inf")).reshape(batch, -1).topk(num_negatives, dim=1).values
    pos = scores.diagonal(dim1=0, dim2=1).t()
    return F.softplus(torch.logsumexp(neg, dim=1, keepdim=True) - pos)[mask].mean()


@pytest.mark.parametrize("num_negatives", [1, 3, 9])
def test_hard_negative_gradients_match_topk(num_negatives: int) -> None:
    query, keys, mask = make(7, batch=7, length=6)
    q1, k1 = query.double().requires_grad_(True), keys.double().requires_grad_(True)
    cra_loss(q1, k1, mask, 0.7, num_negatives).backward()
    q2, k2 = query.double().requires_grad_(True), keys.double().requires_grad_(True)
    topk_nce(q2, k2, mask, 0.7, num_negatives).backward()
    # the loss computes its scores in float32
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(k1.grad, k2.grad, rtol=1e-5, atol=1e-7)


def test_tied_negatives_count_exactly_k() -> None:
    # the same image twice in a batch (Flickr's five captions per image) makes exact ties among the negatives
    query, keys, mask = make(8, batch=6, length=4)
    keys[3], mask[3] = keys[1], mask[1]
    query[3] = query[1]
    for n in (1, 2, 5, 8):
        got = cra_loss(query.double(), keys.double(), mask, 0.7, n)
        torch.testing.assert_close(got.double(), topk_nce(query.double(), keys.double(), mask, 0.7, n))
        assert abs(float(got) - reference_nce(query, keys, mask, 0.7, n)) < 1e-5


def test_padding_never_changes_loss_or_gradients() -> None:
    query, keys, mask = make(6)
    q1, k1 = query.clone().requires_grad_(True), keys.clone().requires_grad_(True)
    loss = cra_loss(q1, k1, mask, 0.7, 7)
    loss.backward()

    garbage = torch.randn(keys.shape[0], 3, keys.shape[2]) * 50
    garbage[2, 1, 0] = float("nan")
    keys_p = torch.cat([keys, garbage], dim=1)
    keys_p[:, : keys.shape[1]][~mask] = 9.0  # garbage at masked positions inside the original length too
    mask_p = torch.cat([mask, torch.zeros(keys.shape[0], 3, dtype=torch.bool)], dim=1)
    q2, k2 = query.clone().requires_grad_(True), keys_p.requires_grad_(True)
    loss_p = cra_loss(q2, k2, mask_p, 0.7, 7)
    loss_p.backward()
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(q2.grad, q1.grad)
    torch.testing.assert_close(k2.grad[:, : keys.shape[1]], k1.grad)


def test_single_pair_and_empty_pairs_are_safe() -> None:
    query, keys, mask = make(7, batch=1)
    q = query.clone().requires_grad_(True)
    loss = cra_loss(q, keys, mask, 0.7, 512)
    loss.backward()
    assert loss.item() == 0.0 and bool(torch.isfinite(q.grad).all())

    query, keys, mask = make(8)
    mask[2] = False  # pair 2 has no valid local: no positives from it, and none of its keys are negatives
    got = cra_loss(query, keys, mask, 0.7, 5)
    assert abs(float(got) - reference_nce(query, keys, mask, 0.7, 5)) < 1e-5
    assert float(cra_loss(query, keys, torch.zeros_like(mask), 0.7, 5)) == 0.0


def test_autocast_scores_in_float32() -> None:
    query, keys, mask = make(9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cra_loss(query, keys, mask, 0.7, 6)
    assert got.dtype == torch.float32
    assert abs(float(got) - reference_nce(query, keys, mask, 0.7, 6)) < 1e-5


def test_bad_shapes_raise_named_errors() -> None:
    query, keys, mask = make(10)
    with pytest.raises(InputError, match="query"):
        cra_loss(query[0], keys, mask)
    with pytest.raises(InputError, match="keys_mask"):
        cra_loss(query, keys, mask[:, :2])
    with pytest.raises(InputError, match="batch size"):
        cra_loss(query[:3], keys, mask)
    with pytest.raises(InputError, match="temperature"):
        cra_loss(query, keys, mask, 0.0)


def reference_pooled(query, keys, mask, temperature, num_negatives):
    """The pooled variant written out: one term per pair, its positives summed in the numerator."""
    terms = []
    batch, length, _ = keys.shape
    for b in range(batch):
        negatives = hardest_negatives(query, keys, mask, b, temperature, num_negatives)
        pos = sum(math.exp(float(query[b] @ keys[b, i]) / temperature) for i in range(length) if mask[b, i])
        if pos:
            terms.append(-math.log(pos / (pos + sum(math.exp(n) for n in negatives))))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("num_negatives", [0, 3, 40])
def test_pooled_positives_match_loop_reference(num_negatives: int) -> None:
    query, keys, mask = make(num_negatives + 5)
    mask[2] = False  # a pair without valid locals contributes nothing
    query.requires_grad_(True)
    got = cra_loss(query, keys, mask, 0.2, num_negatives, positives="pooled")
    want = reference_pooled(query.detach(), keys, mask, 0.2, num_negatives)
    assert abs(float(got.detach()) - want) < 1e-5 * max(1.0, want)
    got.backward()
    assert torch.isfinite(query.grad).all()
    with pytest.raises(InputError, match="'each' or 'pooled'"):
        cra_loss(query, keys, mask, 0.2, num_negatives, positives="all")
