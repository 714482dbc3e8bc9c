import torch

from selfalign.losses import hinge_triplet_loss


def reference(sims, ids, margin, hardest):
    n = len(sims)
    total = 0.0
    for i in range(n):
        caption_costs = [max(0.0, margin - float(sims[i][i]) + float(sims[i][j])) for j in range(n) if ids[j] != ids[i]]
        image_costs = [max(0.0, margin - float(sims[i][i]) + float(sims[j][i])) for j in range(n) if ids[j] != ids[i]]
        if hardest:
            total += max(caption_costs, default=0.0) + max(image_costs, default=0.0)
        else:
            total += sum(caption_costs) + sum(image_costs)
    return total


def test_matches_loop_reference_with_siblings():
    torch.manual_seed(0)
    sims = torch.randn(8, 8)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])  # siblings share an image id
    for hardest in (True, False):
        got = hinge_triplet_loss(sims, ids, 0.2, hardest)
        assert torch.allclose(got, torch.tensor(reference(sims.tolist(), ids.tolist(), 0.2, hardest),
                                                dtype=got.dtype), atol=1e-5)


def test_sibling_caption_is_never_a_negative():
    sims = torch.tensor([[1.0, 0.99], [0.99, 1.0]])
    assert hinge_triplet_loss(sims, torch.tensor([5, 5])) == 0  # same image: nothing to separate
    assert hinge_triplet_loss(sims, torch.tensor([5, 6])) > 0
