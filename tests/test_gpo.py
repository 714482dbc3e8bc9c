"""GPO pooling: weights from the valid count alone, order- and padding-invariant; the no-grad table of weights
matches the GRU's and follows every change of the parameters."""

from __future__ import annotations

import torch

from selfalign.model.gpo import GPO, MeanPool


def _gpo(seed: int = 0) -> GPO:
    torch.manual_seed(seed)
    return GPO()


def test_weights_sum_to_one_over_the_valid_ranks_and_are_zero_beyond():
    gpo = _gpo()
    lengths = torch.tensor([1, 3, 7, 7, 2])
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            w = gpo.weights(lengths, 9)
        assert w.shape == (5, 9)
        for row, n in zip(w, lengths.tolist()):
            assert torch.allclose(row[:n].sum(), torch.tensor(1.0), atol=1e-6)
            assert (row[n:] == 0).all() and (row[:n] > 0).all()


def test_the_no_grad_table_matches_the_gru_for_every_count_and_padding():
    gpo = _gpo()
    lengths = torch.tensor([4, 1, 12, 4, 9])
    exact = gpo.weights(lengths, 15).detach()  # with gradients: the GRU itself
    with torch.no_grad():
        first = gpo.weights(lengths, 15)
        shorter = gpo.weights(torch.tensor([3, 2]), 5)  # counts already in the table, a narrower padding
        longer = gpo.weights(torch.tensor([20, 4]), 25)  # a count the table does not hold yet: it grows
    torch.testing.assert_close(first, exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(shorter, gpo.weights(torch.tensor([3, 2]), 5).detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(longer, gpo.weights(torch.tensor([20, 4]), 25).detach(), rtol=0, atol=1e-6)


def test_the_table_follows_optimiser_steps_state_loads_and_casts():
    gpo = _gpo()
    lengths = torch.tensor([5, 2])
    with torch.no_grad():
        before = gpo.weights(lengths, 6)
    opt = torch.optim.SGD(gpo.parameters(), lr=1.0)
    gpo.weights(lengths, 6)[:, 0].sum().backward()
    opt.step()
    with torch.no_grad():
        after_step = gpo.weights(lengths, 6)
    assert not torch.allclose(after_step, before)
    torch.testing.assert_close(after_step, gpo.weights(lengths, 6).detach(), rtol=0, atol=1e-6)

    gpo.load_state_dict(_gpo(seed=3).state_dict())
    with torch.no_grad():
        loaded = gpo.weights(lengths, 6)
    torch.testing.assert_close(loaded, _gpo(seed=3).weights(lengths, 6).detach(), rtol=0, atol=1e-6)

    gpo.double()
    with torch.no_grad():
        cast = gpo.weights(lengths, 6)
    assert cast.dtype == torch.float64
    torch.testing.assert_close(cast.float(), loaded, rtol=0, atol=1e-6)


def test_training_still_reaches_the_gru():
    gpo = _gpo()
    features, mask = torch.randn(3, 6, 4), torch.ones(3, 6, dtype=torch.bool)
    gpo(features, mask).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gpo.gru.parameters())


def test_pooling_ignores_order_and_padding():
    gpo = _gpo()
    features = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    garbage = features.clone()
    garbage[1, 3:] = 100.0  # padded slots never leak into the pooled vector
    shuffled = garbage[:, [2, 0, 1, 4, 3]].clone()
    shuffled_mask = mask[:, [2, 0, 1, 4, 3]]  # valid features need not come first
    for pool in (gpo, MeanPool()):
        with torch.no_grad():
            reference = pool(features, mask)
            torch.testing.assert_close(pool(garbage, mask), reference)
            torch.testing.assert_close(pool(shuffled, shuffled_mask), reference)
    with torch.no_grad():
        single = gpo(features[:, :1], torch.ones(2, 1, dtype=torch.bool))
    torch.testing.assert_close(single, features[:, 0])  # one valid feature: weight 1
