"""SCAN t2i scoring: the batched, chunked implementation against a literal per-pair loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfalign.crossattn import SCANScorer, scan_t2i_scores
from selfalign.errors import ConfigError, InputError


def naive_pair(regions: torch.Tensor, words: torch.Tensor, lam: float, pooling: str, lam_lse: float) -> float:
    """One pair, SCAN's func_attention + xattn_score_t2i written out step by step (valid rows only)."""
    v = regions / (regions.norm(dim=1, keepdim=True) + 1e-8)  # [R, d]
    e = words / (words.norm(dim=1, keepdim=True) + 1e-8)  # [L, d]
    sims = []
    for w in e:
        s = v @ w  # [R]
        sims.append(s)
    s = torch.stack(sims, dim=1)  # [R, L]
    s = F.leaky_relu(s, 0.1)
    s = s / (s.norm(dim=1, keepdim=True) + 1e-8)  # clipped_l2norm over words
    attn = torch.softmax(lam * s, dim=0)  # over regions, per word
    scores = []
    for li in range(e.shape[0]):
        context = (attn[:, li:li + 1] * v).sum(dim=0)
        scores.append(F.cosine_similarity(e[li], context, dim=0, eps=1e-8))
    row = torch.stack(scores)
    if pooling == "lse":
        return float(torch.log(torch.exp(lam_lse * row).sum()) / lam_lse)
    return float(row.mean())


def make_batch(seed: int, n: int = 5, m: int = 7, r: int = 6, length: int = 8, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(n, r, d, generator=g, dtype=torch.float64)
    words = torch.randn(m, length, d, generator=g, dtype=torch.float64)
    n_reg = torch.randint(1, r + 1, (n,), generator=g)
    n_word = torch.randint(1, length + 1, (m,), generator=g)
    n_reg[0], n_word[0] = r, length  # one unpadded row each
    n_reg[1], n_word[1] = 1, 1  # and the extreme of a single valid entry
    rmask = torch.arange(r)[None] < n_reg[:, None]
    wmask = torch.arange(length)[None] < n_word[:, None]
    # Padding holds garbage, not zeros: the masks alone must keep it out.
    regions[~rmask] = 50.0
    words[~wmask] = -30.0
    return regions, rmask, words, wmask, n_reg, n_word


def naive_matrix(regions, words, n_reg, n_word, lam, pooling, lam_lse) -> torch.Tensor:
    out = torch.zeros(regions.shape[0], words.shape[0], dtype=torch.float64)
    for i in range(regions.shape[0]):
        for j in range(words.shape[0]):
            out[i, j] = naive_pair(regions[i, : n_reg[i]], words[j, : n_word[j]], lam, pooling, lam_lse)
    return out


@pytest.mark.parametrize("pooling", ["lse", "mean"])
@pytest.mark.parametrize("chunks", [(None, None), (2, 3), (1, 1), (5, 7)])
def test_matches_naive_loop(pooling: str, chunks: tuple) -> None:
    regions, rmask, words, wmask, n_reg, n_word = make_batch(0)
    expected = naive_matrix(regions, words, n_reg, n_word, 9.0, pooling, 6.0)
    got = scan_t2i_scores(regions, rmask, words, wmask, 9.0, pooling, 6.0,
                          chunk_images=chunks[0], chunk_captions=chunks[1])
    assert got.shape == (5, 7)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_float32_and_other_lambdas() -> None:
    regions, rmask, words, wmask, n_reg, n_word = make_batch(1, n=4, m=3, r=9, length=5, d=32)
    expected = naive_matrix(regions, words, n_reg, n_word, 4.0, "lse", 2.0)
    got = scan_t2i_scores(regions.float(), rmask, words.float(), wmask, lambda_softmax=4.0, lambda_lse=2.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_no_masks_means_all_valid_and_scale_invariant() -> None:
    g = torch.Generator().manual_seed(2)
    regions, words = torch.randn(3, 4, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    a = scan_t2i_scores(regions, None, words, None)
    b = scan_t2i_scores(regions * 7.0, torch.ones(3, 4, dtype=torch.bool), words * 0.1, torch.ones(2, 5))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pair_scores_do_not_depend_on_batch_company() -> None:
    regions, rmask, words, wmask, *_ = make_batch(3)
    full = scan_t2i_scores(regions, rmask, words, wmask)
    one = scan_t2i_scores(regions[2:3], rmask[2:3], words[4:5], wmask[4:5])
    torch.testing.assert_close(one[0, 0], full[2, 4])


def test_scorer_module_is_differentiable() -> None:
    regions, rmask, words, wmask, *_ = make_batch(4)
    img = regions.float().requires_grad_(True)
    txt = words.float().requires_grad_(True)
    scorer = SCANScorer(chunk_images=2, chunk_captions=4)
    sims = scorer(img, rmask, txt, wmask)
    assert sims.shape == (5, 7)
    (sims * torch.linspace(-1.0, 1.0, 35).view(5, 7)).sum().backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()
    assert torch.isfinite(txt.grad).all()
    # Padding never receives gradient: it does not influence any score.
    assert (img.grad[~rmask] == 0).all()
    assert (txt.grad[~wmask] == 0).all()
    assert img.grad[rmask].abs().sum() > 0
    assert list(scorer.parameters()) == []


def test_gradcheck_small() -> None:
    g = torch.Generator().manual_seed(5)
    img = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    wmask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda a, b: scan_t2i_scores(a, None, b, wmask, chunk_images=1), (img, txt))


def test_bad_inputs() -> None:
    regions, rmask, words, wmask, *_ = make_batch(6)
    with pytest.raises(InputError, match="region dim"):
        scan_t2i_scores(regions, rmask, words[..., :8], wmask)
    with pytest.raises(InputError, match="3-D"):
        scan_t2i_scores(regions[0], None, words, wmask)
    with pytest.raises(InputError, match="region_mask"):
        scan_t2i_scores(regions, rmask[:, :2], words, wmask)
    empty = wmask.clone()
    empty[3] = False
    with pytest.raises(InputError, match="word_mask: row 3"):
        scan_t2i_scores(regions, rmask, words, empty)
    with pytest.raises(ConfigError, match="pooling"):
        scan_t2i_scores(regions, rmask, words, wmask, pooling="max")
    with pytest.raises(ConfigError, match="chunk_images"):
        scan_t2i_scores(regions, rmask, words, wmask, chunk_images=0)
    with pytest.raises(ConfigError):
        SCANScorer(pooling="sum")
