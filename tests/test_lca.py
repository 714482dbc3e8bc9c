"""LCA: the loss equals a per-sample loop of the method.md formula; gradients, padding, codebook handling."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfalign.align.lca import LCA
from selfalign.errors import ConfigError, InputError

EPS, ITERS, TAU = 0.05, 3, 0.1


def naive_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """SwAV's exp-domain procedure in float64 with plain loops over prototypes and samples."""
    q = torch.exp(scores.double() / eps).t().clone()  # [K, N]
    k, n = q.shape
    q /= q.sum()
    for _ in range(iters):
        for row in range(k):
            q[row] /= q[row].sum() * k
        for col in range(n):
            q[:, col] /= q[:, col].sum() * n
    return (q * n).t()


def _one_direction(codebook, tgt, tgt_mask, match_mask, src, src_weight):
    """Loop reference: sources predict the Sinkhorn code of their argmax-cosine target in the SAME pair."""
    batch = tgt.shape[0]
    positions = [(b, m) for b in range(batch) for m in range(tgt.shape[1]) if tgt_mask[b, m]]
    feats = torch.stack([tgt[b, m] for b, m in positions]).detach()
    codes = naive_sinkhorn(feats @ codebook.detach().t(), EPS, ITERS)
    code_of = {pos: codes[i] for i, pos in enumerate(positions)}
    per_pair = []
    for b in range(batch):
        eligible = [m for m in range(tgt.shape[1]) if match_mask[b, m]]
        total, weight_sum = 0.0, 0.0
        for s in range(src.shape[1]):
            w = float(src_weight[b, s])
            if w <= 0 or not eligible:
                continue
            best = max(eligible, key=lambda m: float(src[b, s].detach() @ tgt[b, m].detach()))
            log_p = torch.log_softmax(codebook @ src[b, s] / TAU, dim=0)
            total = total + w * -(code_of[(b, best)] * log_p).sum()
            weight_sum += w
        if weight_sum > 0:
            per_pair.append(total / weight_sum)
    return torch.stack(per_pair).mean()


def reference_lca(codebook, img, img_mask, txt, txt_mask, direction, word_weight=None):
    weight = txt_mask.double() * (1.0 if word_weight is None else word_weight.double())
    loss = _one_direction(codebook, img, img_mask, img_mask, txt, weight)
    if direction == "symmetric":
        loss = 0.5 * (loss + _one_direction(codebook, txt, txt_mask, weight > 0, img, img_mask.double()))
    return loss


def make_batch(seed: int, batch=5, regions=6, words=7, dim=8):
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(batch, regions, dim, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(batch, words, dim, generator=gen), dim=-1)
    img_mask = torch.rand(batch, regions, generator=gen) > 0.3
    txt_mask = torch.rand(batch, words, generator=gen) > 0.3
    img_mask[:, 0] = True
    txt_mask[:, 0] = True
    return img, img_mask, txt, txt_mask


def run(lca: LCA, img, img_mask, txt, txt_mask, word_weight=None):
    img = img.clone().requires_grad_(True)
    txt = txt.clone().requires_grad_(True)
    lca.zero_grad(set_to_none=True)
    loss = lca(img, img_mask, txt, txt_mask, word_weight)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, lca.codebook.grad.clone()


@pytest.mark.parametrize("direction", ["text_to_image", "symmetric"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_reference_value_and_gradients(direction: str, seed: int) -> None:
    torch.manual_seed(seed)
    lca = LCA(8, codebook_size=10, epsilon=EPS, iterations=ITERS, student_temperature=TAU, direction=direction)
    img, img_mask, txt, txt_mask = make_batch(seed)
    loss, _, txt_grad, code_grad = run(lca, img, img_mask, txt, txt_mask)

    codebook = lca.codebook.detach().double().clone().requires_grad_(True)  # normalised by the forward
    txt_ref = txt.double().clone().requires_grad_(True)
    ref = reference_lca(codebook, img.double(), img_mask, txt_ref, txt_mask, direction)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-4 * max(1.0, abs(ref.item()))
    torch.testing.assert_close(txt_grad.double(), txt_ref.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(code_grad.double(), codebook.grad, rtol=1e-3, atol=1e-5)


def test_word_weight_restricts_words_and_empty_captions_drop_out() -> None:
    torch.manual_seed(3)
    img, img_mask, txt, txt_mask = make_batch(3)
    word_weight = (torch.rand(txt_mask.shape) > 0.5).float()
    word_weight[1] = 0.0  # caption 1 has no selected word: it must not enter the mean
    for direction in ("text_to_image", "symmetric"):
        lca = LCA(8, 10, EPS, ITERS, TAU, direction)
        loss = lca(img, img_mask, txt, txt_mask, word_weight)
        ref = reference_lca(lca.codebook.detach().double(), img.double(), img_mask, txt.double(), txt_mask, direction, word_weight)
        assert abs(loss.item() - ref.item()) < 1e-4 * max(1.0, ref.item())
        assert torch.isfinite(loss)


def test_no_selected_words_gives_zero_that_backpropagates() -> None:
    img, img_mask, txt, txt_mask = make_batch(4)
    lca = LCA(8, 10)
    loss = lca(img, img_mask, txt, txt_mask, torch.zeros(txt_mask.shape))
    loss.backward()
    assert loss.item() == 0.0


def test_text_to_image_gives_regions_no_gradient_but_symmetric_does() -> None:
    img, img_mask, txt, txt_mask = make_batch(5)
    _, img_grad, txt_grad, code_grad = run(LCA(8, 10, direction="text_to_image"), img, img_mask, txt, txt_mask)
    assert img_grad is None or float(img_grad.abs().max()) == 0.0
    assert float(txt_grad.abs().max()) > 0 and float(code_grad.abs().max()) > 0
    _, img_grad, _, _ = run(LCA(8, 10, direction="symmetric"), img, img_mask, txt, txt_mask)
    assert img_grad is not None and float(img_grad.abs().max()) > 0


@pytest.mark.parametrize("direction", ["text_to_image", "symmetric"])
def test_padding_never_changes_the_loss(direction: str) -> None:
    torch.manual_seed(6)
    img, img_mask, txt, txt_mask = make_batch(6)
    lca = LCA(8, 10, direction=direction)
    lca_copy = copy.deepcopy(lca)
    loss, img_grad, txt_grad, code_grad = run(lca, img, img_mask, txt, txt_mask)

    batch, _, dim = img.shape
    garbage_img = torch.randn(batch, 3, dim) * 100
    garbage_img[0, 0, 0] = float("nan")
    garbage_txt = torch.randn(batch, 4, dim) * 100
    garbage_txt[1, 2, 3] = float("inf")
    img_p = torch.cat([img, garbage_img], dim=1)
    txt_p = torch.cat([txt, garbage_txt], dim=1)
    img_mask_p = torch.cat([img_mask, torch.zeros(batch, 3, dtype=torch.bool)], dim=1)
    txt_mask_p = torch.cat([txt_mask, torch.zeros(batch, 4, dtype=torch.bool)], dim=1)
    # Garbage also at positions already masked inside the original length.
    img_p[:, : img.shape[1]][~img_mask] = 55.0
    txt_p[:, : txt.shape[1]][~txt_mask] = -7.0
    loss_p, img_grad_p, txt_grad_p, code_grad_p = run(lca_copy, img_p, img_mask_p, txt_p, txt_mask_p)
    torch.testing.assert_close(loss_p, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(code_grad_p, code_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(txt_grad_p[:, : txt.shape[1]], txt_grad, rtol=1e-5, atol=1e-7)
    assert float(txt_grad_p[:, txt.shape[1] :].abs().max()) == 0.0
    if direction == "symmetric":
        torch.testing.assert_close(img_grad_p[:, : img.shape[1]], img_grad, rtol=1e-5, atol=1e-7)


def test_word_matches_only_its_own_image() -> None:
    # Word 0 of caption 0 is identical to a region of image 1 but must match within image 0.
    dim = 4
    img = F.normalize(torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]], [[0, 0, 1.0, 0], [0, 0, 0, 1.0]]]), dim=-1)
    txt = F.normalize(torch.tensor([[[0, 0.1, 1.0, 0]], [[0, 0, 0, 1.0]]]), dim=-1)
    masks = torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool)
    lca = LCA(dim, 3, direction="text_to_image")
    loss = lca(img, masks[0], txt, masks[1])
    ref = reference_lca(lca.codebook.detach().double(), img.double(), masks[0], txt.double(), masks[1], "text_to_image")
    assert abs(loss.item() - ref.item()) < 1e-5


def test_codebook_rows_normalised_and_default_init() -> None:
    lca = LCA(16, 32)
    bound = 1.0 / np.sqrt(16)
    assert float(lca.codebook.detach().abs().max()) <= bound  # nn.Linear default: U(-1/sqrt(d), 1/sqrt(d))
    img, img_mask, txt, txt_mask = make_batch(7, dim=16)
    lca(img, img_mask, txt, txt_mask)
    torch.testing.assert_close(lca.codebook.norm(dim=1), torch.ones(32))


def test_initialize_codebook_samples_unit_rows_of_the_features() -> None:
    features = F.normalize(torch.randn(50, 8), dim=1) * 3.0  # not unit: the codebook must normalise them
    lca = LCA(8, 20)
    lca.initialize_codebook(features, torch.Generator().manual_seed(0))
    unit = F.normalize(features, dim=1)
    # every prototype is one of the features, no feature twice
    match = (lca.codebook.detach() @ unit.t()).max(dim=1)
    torch.testing.assert_close(match.values, torch.ones(20))
    assert len(set(match.indices.tolist())) == 20
    again = LCA(8, 20)
    again.initialize_codebook(features, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.codebook, lca.codebook, rtol=0, atol=0)


def test_initialize_codebook_with_fewer_features_than_prototypes() -> None:
    features = F.normalize(torch.randn(5, 8), dim=1)
    lca = LCA(8, 12)
    lca.initialize_codebook(features, torch.Generator().manual_seed(1))
    protos = lca.codebook.detach()
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(12))
    assert float((protos @ features.t()).max(dim=1).values.min()) > 0.99  # near a feature ...
    assert int(torch.triu((protos @ protos.t()) > 0.99999, diagonal=1).sum()) == 0  # ... and never a duplicate
    with pytest.raises(InputError, match="features"):
        lca.initialize_codebook(torch.randn(5, 4))


def test_data_initialised_codebook_gives_sharper_targets_on_clustered_regions() -> None:
    from selfalign.analysis.codebook import target_entropy

    torch.manual_seed(3)
    centres = F.normalize(torch.randn(16, 256), dim=1)  # the demo's width: random prototypes see all alike
    regions = F.normalize(centres.repeat(40, 1) + 0.05 * torch.randn(640, 256), dim=1)
    random_init, data_init = LCA(256, 64), LCA(256, 64)
    data_init.initialize_codebook(regions, torch.Generator().manual_seed(0))
    random_init.normalize_codebook()
    sharp = target_entropy(regions, data_init.codebook.detach(), EPS, ITERS)["mean_entropy"]
    flat = target_entropy(regions, random_init.codebook.detach(), EPS, ITERS)["mean_entropy"]
    assert sharp < flat - 1.0  # measured 1.08 vs 3.51 nats


def test_freeze_drops_the_codebook_gradient() -> None:
    img, img_mask, txt, txt_mask = make_batch(8)
    lca = LCA(8, 10)
    lca.freeze_codebook(True)
    assert lca.codebook_frozen and lca.codebook.requires_grad
    lca(img, img_mask, txt.requires_grad_(True), txt_mask).backward()
    lca.drop_frozen_grad()
    assert lca.codebook.grad is None
    before = lca.codebook.detach().clone()
    torch.optim.AdamW(lca.parameters(), lr=0.1, weight_decay=0.1).step()
    torch.testing.assert_close(lca.codebook.detach(), before, rtol=0, atol=0)
    lca.freeze_codebook(False)
    lca(img, img_mask, txt, txt_mask).backward()
    lca.drop_frozen_grad()
    assert lca.codebook.grad is not None


def test_assign_is_argmax_over_normalised_prototypes() -> None:
    torch.manual_seed(9)
    lca = LCA(8, 10)
    feats = torch.randn(20, 8)
    protos = lca.codebook.detach()
    want = [max(range(10), key=lambda k: float(protos[k] @ x) / float(protos[k].norm())) for x in feats]
    assert lca.assign(feats).tolist() == want


def test_bad_inputs_raise_named_errors() -> None:
    img, img_mask, txt, txt_mask = make_batch(10)
    lca = LCA(8, 10)
    with pytest.raises(InputError, match="img_free"):
        lca(img[..., :4], img_mask, txt, txt_mask)
    with pytest.raises(InputError, match="txt_free_mask"):
        lca(img, img_mask, txt, txt_mask[:, :2])
    with pytest.raises(InputError, match="batch size"):
        lca(img[:2], img_mask[:2], txt, txt_mask)
    with pytest.raises(InputError, match="word_weight"):
        lca(img, img_mask, txt, txt_mask, torch.ones(2, 2))
    with pytest.raises(ConfigError, match="lca_direction"):
        LCA(8, 10, direction="image_to_text")
