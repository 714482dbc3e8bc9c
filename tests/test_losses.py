import pytest
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


def _kl_reference(student, teacher, temperature):
    """Loop over rows and columns: sum of KL(softmax(teacher / T) || softmax(student / T))."""
    total = 0.0
    for s, t in [(student[i], teacher[i]) for i in range(len(student))] + \
                [(student[:, j], teacher[:, j]) for j in range(len(student))]:
        p, q = torch.softmax(t / temperature, 0), torch.softmax(s / temperature, 0)
        total += float((p * (p.log() - q.log())).sum())
    return total


def test_distillation_matches_loop_reference_and_vanishes_at_the_teacher():
    from selfalign.losses import distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(7, 7) * 0.3, torch.randn(7, 7) * 0.3
    got = distillation_loss(student, teacher, 0.1)
    assert float(got) == pytest.approx(_kl_reference(student, teacher, 0.1), rel=1e-4)
    assert float(distillation_loss(teacher, teacher, 0.1)) == pytest.approx(0.0, abs=1e-5)
    # a constant shift of a row changes no distribution of that row, but it does change the columns'
    assert float(distillation_loss(teacher + 1.0, teacher, 0.1)) == pytest.approx(0.0, abs=1e-4)


def test_distillation_shares_add_up_and_pull_towards_the_teacher():
    from selfalign.losses import distillation_loss

    torch.manual_seed(1)
    teacher = torch.randn(9, 9) * 0.3
    student = torch.randn(9, 9, requires_grad=True)
    full = distillation_loss(student, teacher, 0.05)
    parts = [distillation_loss(student, teacher, 0.05, anchors=s) for s in (slice(0, 4), slice(4, 9))]
    assert torch.allclose(sum(parts), full)
    full.backward()
    with torch.no_grad():
        stepped = student - 1e-3 * student.grad
        assert float(distillation_loss(stepped, teacher, 0.05)) < float(full)
