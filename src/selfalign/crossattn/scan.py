"""SCAN text-to-image stacked cross-attention scoring (Lee et al., ECCV 2018), batched and chunked.

For one (image, caption) pair with regions ``v_r`` and words ``e_l`` (both L2-normalised):

    s_rl  = v_r . e_l                                  raw region-word cosine          [R, L]
    s'_rl = leaky_relu(s_rl, 0.1) / ||leaky_relu(s_r., 0.1)||_words                 ("clipped_l2norm")
    a_rl  = softmax_r(lambda_softmax * s'_rl)           each word attends over regions
    c_l   = sum_r a_rl v_r                              attended image context per word
    S     = LSE_l(cos(e_l, c_l); lambda_lse)  or  mean_l cos(e_l, c_l)      over VALID words only

SCAN computes this one caption at a time. Here every pair in an (images chunk x captions chunk) block is
scored at once with a single GEMM, and the context vectors are never materialised: ``e_l . c_l =
sum_r a_rl s_rl`` and ``||c_l||^2 = a_l^T G a_l`` with ``G = V V^T`` the region Gram matrix, so each block
costs O(n m R L (d + R)) time and O(n m R L) memory instead of O(n m L d).

Cost anchor: about 4 R L d FLOPs per pair versus 2 d for a dot product, so use it as a re-ranker on a
short list (k candidates per query), not over a whole gallery.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from selfalign.errors import ConfigError, InputError

DEFAULT_MAX_ELEMENTS = 1 << 23  # entries of one [n, R, m, L] block (32 MB in float32)
# On a CPU, smaller blocks (closer to cache size) run the dozen elementwise passes per block ~1.5x faster
# (measured: 50 grid regions x 1.5K Flickr captions, 256-d, one thread).
CPU_MAX_ELEMENTS = 1 << 20
CPU_CHUNK_CAPTIONS = 256


def _as_tensor(x: Any, name: str, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != ndim:
        raise InputError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    return t


def _mask(mask: Any, shape: tuple[int, int], name: str, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    m = _as_tensor(mask, name, 2)
    if tuple(m.shape) != shape:
        raise InputError(f"{name}: expected shape {shape}, got {tuple(m.shape)}")
    m = m.to(device=device, dtype=torch.bool)
    empty = ~m.any(dim=1)
    if bool(empty.any()):
        raise InputError(f"{name}: row {int(empty.nonzero()[0])} has no valid entries")
    return m


def _extent(mask: torch.Tensor) -> torch.Tensor:
    """``mask [B, L]`` -> ``[B]``: one past each row's last valid position (masks need not be prefixes)."""
    return (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax(dim=1)


def _length_order(lengths: torch.Tensor) -> torch.Tensor | None:
    """Stable order sorting ``lengths [B]`` ascending, or None when they already are (nothing to reorder)."""
    if bool((lengths[1:] >= lengths[:-1]).all()):
        return None
    return torch.argsort(lengths, stable=True)


def _l2norm(x: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    # SCAN's l2norm: x / (||x|| + eps), so all-zero (padding) vectors stay zero instead of NaN. vector_norm, not
    # pow().sum().sqrt(): its gradient at an all-zero vector is 0, where sqrt's is inf (NaN through the mask).
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)


def _score_block(
    img: torch.Tensor, img_mask: torch.Tensor, cap: torch.Tensor, cap_mask: torch.Tensor,
    lambda_softmax: float, pooling: str, lambda_lse: float, eps: float, gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """SCAN t2i scores for ``img [n, R, d]`` x ``cap [m, L, d]`` (both unit-norm rows) -> ``[n, m]``.

    ``gram [n, R, R]`` (the images' region Gram matrices) gives ``||c_l||`` without forming the contexts; with
    None the contexts ``[n, m, L, d]`` are formed, which is cheaper when the block has fewer words than regions.
    """
    n, r, d = img.shape
    m, length, _ = cap.shape
    # [n, R, m, L]: one GEMM over all region-word pairs of the block.
    raw = (img.reshape(n * r, d) @ cap.reshape(m * length, d).t()).view(n, r, m, length)
    wmask = cap_mask.view(1, 1, m, length)
    clipped = F.leaky_relu(raw, 0.1) * wmask  # padded words must not enter the per-region norm
    normed = _l2norm(clipped, dim=3, eps=eps)
    logits = (lambda_softmax * normed).masked_fill(~img_mask.view(n, r, 1, 1), float("-inf"))
    attn = torch.softmax(logits, dim=1)  # each word's distribution over this image's valid regions
    dot = (attn * raw).sum(dim=1)  # e_l . c_l                                       [n, m, L]
    if gram is not None:
        g_attn = torch.bmm(gram, attn.reshape(n, r, m * length)).view(n, r, m, length)
        ctx_sq = (attn * g_attn).sum(dim=1)  # ||c_l||^2 = a_l^T G a_l                  [n, m, L]
    else:
        ctx_sq = torch.einsum("nrml,nrd->nmld", attn, img).pow(2).sum(dim=3)
    ctx_norm = ctx_sq.clamp_min(eps * eps).sqrt()  # ||c_l||                           [n, m, L]
    word_norm = cap.norm(dim=2).clamp_min(eps).view(1, m, length)  # 1 up to the l2norm eps
    cos = dot / (ctx_norm.clamp_min(eps) * word_norm)
    valid = cap_mask.view(1, m, length)
    if pooling == "lse":
        return torch.logsumexp((lambda_lse * cos).masked_fill(~valid, float("-inf")), dim=2) / lambda_lse
    return (cos * valid).sum(dim=2) / valid.sum(dim=2)


def scan_t2i_scores(
    regions: torch.Tensor,
    region_mask: torch.Tensor | None,
    words: torch.Tensor,
    word_mask: torch.Tensor | None,
    lambda_softmax: float = 9.0,
    pooling: str = "lse",
    lambda_lse: float = 6.0,
    chunk_images: int | None = None,
    chunk_captions: int | None = None,
    device: str | torch.device | None = None,
    eps: float = 1e-8,
    normalized: bool = False,
) -> torch.Tensor:
    """SCAN t2i similarity of every image with every caption.

    regions ``[N, R, d]`` with region_mask ``[N, R]`` (True = valid; None = all valid), words ``[M, L, d]``
    with word_mask ``[M, L]``. Inputs are L2-normalised per vector here (cosine attention, as in SCAN).
    Work is split into blocks of ``chunk_images x chunk_captions`` pairs (default: blocks of about
    ``2**23`` region-word entries on CUDA, ``2**20`` on a CPU), each trimmed to its longest caption and image
    after sorting both by length; inputs move to ``device`` (default: that of ``regions``) one block at
    a time, so the full feature arrays may stay on the CPU. ``normalized=True`` promises unit-norm (or all-zero
    padding) vectors, e.g. a gallery normalised once, and skips that pass. Differentiable. Returns ``[N, M]`` on
    ``device``.
    """
    if pooling not in ("lse", "mean"):
        raise ConfigError(f"scan pooling: expected 'lse' or 'mean', got {pooling!r}")
    if lambda_softmax <= 0 or lambda_lse <= 0:
        raise ConfigError(f"scan lambdas must be > 0 (lambda_softmax={lambda_softmax}, lambda_lse={lambda_lse})")
    regions = _as_tensor(regions, "regions", 3)
    words = _as_tensor(words, "words", 3)
    n_img, n_reg, d = regions.shape
    n_cap, n_word, d_txt = words.shape
    if d != d_txt:
        raise InputError(f"scan: region dim {d} != word dim {d_txt}")
    if n_img == 0 or n_cap == 0 or n_reg == 0 or n_word == 0:
        raise InputError(f"scan: empty input (regions {tuple(regions.shape)}, words {tuple(words.shape)})")
    dev = torch.device(device) if device is not None else regions.device
    img_mask = _mask(region_mask, (n_img, n_reg), "region_mask", dev)
    cap_mask = _mask(word_mask, (n_cap, n_word), "word_mask", dev)
    dtype = torch.promote_types(regions.dtype, torch.float32)

    for name, value in (("chunk_images", chunk_images), ("chunk_captions", chunk_captions)):
        if value is not None and value < 1:
            raise ConfigError(f"scan {name}: must be >= 1, got {value}")
    per_pair = n_reg * n_word
    budget, cap_limit = (DEFAULT_MAX_ELEMENTS, 1024) if dev.type == "cuda" else (CPU_MAX_ELEMENTS, CPU_CHUNK_CAPTIONS)
    cc = chunk_captions or max(1, min(n_cap, cap_limit, budget // per_pair))
    ci = chunk_images or max(1, min(n_img, budget // (per_pair * cc)))

    # Sort captions and images by valid length and trim every block to its longest member: padding is masked
    # out anyway, and real captions vary in length, so most blocks shrink. Scores return in the input order.
    cap_len, img_len = _extent(cap_mask), _extent(img_mask)
    cap_order, img_order = _length_order(cap_len), _length_order(img_len)
    if cap_order is not None:
        words = words[cap_order.to(words.device)]
        cap_mask, cap_len = cap_mask[cap_order], cap_len[cap_order]
    if img_order is not None:  # a gallery of equal-size images (grid regions) is never copied
        regions = regions[img_order.to(regions.device)]
        img_mask, img_len = img_mask[img_order], img_len[img_order]
    unit = (lambda x: x) if normalized else (lambda x: _l2norm(x, 2, eps))

    def caption_blocks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for j in range(0, n_cap, cc):
            width = int(cap_len[j:j + cc].max())
            yield unit(words[j:j + cc, :width].to(dev, dtype)), cap_mask[j:j + cc, :width]

    # Normalise captions once when they already live on the device; otherwise stream them per image chunk
    # so a large caption set never has to fit on the device whole.
    cached = list(caption_blocks()) if (words.device == dev or n_cap <= cc) else None
    # ||c_l|| through each image's Gram matrix (R^2 d once per image, R^2 per word) or from the formed contexts
    # (R d per word): the Gram route wins unless all captions together have fewer words than about R (one query).
    total_words = int(cap_len.sum())
    use_gram = total_words * max(d - n_reg, 1) >= n_reg * d
    rows = []
    for i in range(0, n_img, ci):
        width = int(img_len[i:i + ci].max())
        img = unit(regions[i:i + ci, :width].to(dev, dtype))
        gram = img @ img.transpose(1, 2) if use_gram else None  # [n, R, R], shared by every caption block
        row = [_score_block(img, img_mask[i:i + ci, :width], cap, cmask, lambda_softmax, pooling, lambda_lse, eps,
                            gram)
               for cap, cmask in (cached if cached is not None else caption_blocks())]
        rows.append(torch.cat(row, dim=1))
    scores = torch.cat(rows, dim=0)
    if img_order is not None:
        scores = scores[torch.argsort(img_order)]
    return scores if cap_order is None else scores[:, torch.argsort(cap_order)]


class SCANScorer(nn.Module):
    """SCAN t2i cross-attention as a similarity function (no parameters; gradients flow to the inputs).

    ``forward(img_locals [B_img, R, d], img_mask [B_img, R], txt_locals [B_txt, L, d], txt_mask [B_txt, L])
    -> sims [B_img, B_txt]`` on ``img_locals.device``; masks are True for valid regions / words.
    """

    def __init__(self, lambda_softmax: float = 9.0, pooling: str = "lse", lambda_lse: float = 6.0,
                 chunk_images: int | None = None, chunk_captions: int | None = None) -> None:
        super().__init__()
        if pooling not in ("lse", "mean"):
            raise ConfigError(f"scan pooling: expected 'lse' or 'mean', got {pooling!r}")
        self.lambda_softmax = float(lambda_softmax)
        self.pooling = pooling
        self.lambda_lse = float(lambda_lse)
        self.chunk_images = chunk_images
        self.chunk_captions = chunk_captions

    def forward(self, img_locals: torch.Tensor, img_mask: torch.Tensor | None,
                txt_locals: torch.Tensor, txt_mask: torch.Tensor | None) -> torch.Tensor:
        return scan_t2i_scores(img_locals, img_mask, txt_locals, txt_mask, self.lambda_softmax, self.pooling,
                               self.lambda_lse, self.chunk_images, self.chunk_captions, img_locals.device)

    def extra_repr(self) -> str:
        return f"lambda_softmax={self.lambda_softmax}, pooling={self.pooling!r}, lambda_lse={self.lambda_lse}"
