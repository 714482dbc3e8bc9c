"""Context heads, augmented embeddings and the SelfAlign loss dictionary."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from selfalign.align import ContextHead, SelfAlign, cra_loss
from selfalign.config import AlignConfig
from selfalign.errors import InputError

DIM = 8


def make(seed: int, batch=6, regions=5, words=7, dim=DIM):
    gen = torch.Generator().manual_seed(seed)
    img_free = F.normalize(torch.randn(batch, regions, dim, generator=gen), dim=-1)
    txt_free = F.normalize(torch.randn(batch, words, dim, generator=gen), dim=-1)
    img_ctx = torch.randn(batch, regions, dim, generator=gen)
    txt_ctx = torch.randn(batch, words, dim, generator=gen)
    img_mask = torch.rand(batch, regions, generator=gen) > 0.3
    txt_mask = torch.rand(batch, words, generator=gen) > 0.3
    img_mask[:, :2] = True
    txt_mask[:, :2] = True
    return img_free, img_ctx, img_mask, txt_free, txt_ctx, txt_mask


def reference_head(head: ContextHead, context, mask):
    """§1.4 per sample with loops; BatchNorm in training mode from explicit (biased) batch statistics."""
    def bn(x, layer):
        mean, var = x.mean(0), x.var(0, unbiased=False)
        return (x - mean) / torch.sqrt(var + layer.eps) * layer.weight + layer.bias

    batch, length, _ = context.shape
    h_bar = torch.stack([torch.stack([context[b, i] for i in range(length) if mask[b, i]]).mean(0) for b in range(batch)])
    enhanced = F.relu(bn(h_bar @ head.ctx_fc.weight.t() + head.ctx_fc.bias, head.bn1))
    valid = [(b, i) for b in range(batch) for i in range(length) if mask[b, i]]
    normed = bn(torch.stack([context[b, i] for b, i in valid]), head.bn2)
    locals_ = torch.zeros_like(context)
    for row, (b, i) in enumerate(valid):
        locals_[b, i] = F.normalize(F.relu(normed[row]), dim=0)
    fused, local_mean = [], []
    for b in range(batch):
        hidden = F.relu(head.fusion_hidden(torch.cat([h_bar[b], enhanced[b]])))
        lam = torch.sigmoid(head.fusion_out(hidden))
        fused.append(F.normalize(lam * h_bar[b] + (1 - lam) * enhanced[b], dim=0))
        local_mean.append(torch.stack([locals_[b, i] for i in range(length) if mask[b, i]]).mean(0))
    return h_bar, enhanced, locals_, torch.stack(fused), torch.stack(local_mean)


def test_context_head_matches_loop_reference_in_training_mode() -> None:
    torch.manual_seed(0)
    head = ContextHead(DIM)
    _, ctx, mask, *_ = make(0)
    out = head(ctx, mask)
    for got, want in zip(out[:5], reference_head(head, ctx, mask)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert float(out.locals.detach()[~mask].abs().max()) == 0.0
    torch.testing.assert_close(out.fused.norm(dim=-1), torch.ones(ctx.shape[0]))


def test_bn_statistics_ignore_padding() -> None:
    torch.manual_seed(1)
    head = ContextHead(DIM)
    _, ctx, mask, *_ = make(1)
    padded = ctx.clone()
    padded[~mask] = 1000.0
    head(padded, mask)
    torch.testing.assert_close(head.bn2.running_mean, 0.1 * ctx[mask].mean(0))
    torch.testing.assert_close(head.bn2.running_var, 0.9 + 0.1 * ctx[mask].var(0, unbiased=True))


def test_heads_padding_invariant_in_eval_mode() -> None:
    torch.manual_seed(2)
    head = ContextHead(DIM)
    _, ctx, mask, *_ = make(2)
    head(ctx, mask)  # non-trivial running statistics
    head.eval()
    out = head(ctx, mask)
    garbage = torch.randn(ctx.shape[0], 4, DIM) * 100
    garbage[0, 0, 0] = float("nan")
    padded = torch.cat([ctx, garbage], dim=1)
    padded[:, : ctx.shape[1]][~mask] = -50.0
    mask_p = torch.cat([mask, torch.zeros(ctx.shape[0], 4, dtype=torch.bool)], dim=1)
    out_p = head(padded, mask_p)
    for name in ("global_mean", "enhanced", "fused", "local_mean"):
        torch.testing.assert_close(getattr(out_p, name), getattr(out, name), msg=name)
    torch.testing.assert_close(out_p.locals[:, : ctx.shape[1]], out.locals)
    assert float(out_p.locals.detach()[:, ctx.shape[1] :].abs().max()) == 0.0


def test_embeddings_dot_product_is_the_augmented_similarity() -> None:
    torch.manual_seed(3)
    sa = SelfAlign(DIM, AlignConfig())
    assert sa.embedding_dim == 3 * DIM
    _, img_ctx, img_mask, _, txt_ctx, txt_mask = make(3)
    v = F.normalize(torch.randn(6, DIM), dim=-1)
    t = F.normalize(torch.randn(6, DIM), dim=-1)
    ic, tc = sa.image_context(img_ctx, img_mask), sa.text_context(txt_ctx, txt_mask)
    img_emb, txt_emb = sa.embed_image(v, ic), sa.embed_text(t, tc)
    assert img_emb.shape == txt_emb.shape == (6, 3 * DIM)
    want = v @ t.t() + 0.5 * ic.fused @ tc.local_mean.t() + 0.5 * ic.local_mean @ tc.fused.t()
    torch.testing.assert_close(img_emb @ txt_emb.t(), want)
    sa.eval()
    torch.testing.assert_close(
        sa.image_embedding(v, img_ctx, img_mask) @ sa.text_embedding(t, txt_ctx, txt_mask).t(),
        sa.embed_image(v, sa.image_context(img_ctx, img_mask)) @ sa.embed_text(t, sa.text_context(txt_ctx, txt_mask)).t(),
    )


def test_losses_are_weighted_lca_and_cra_of_the_heads() -> None:
    torch.manual_seed(4)
    cfg = AlignConfig(codebook_size=16, lca_weight=2.0, cra_weight=3.0, cra_negatives=9, cra_temperature=0.5)
    sa = SelfAlign(DIM, cfg)
    sa_copy = copy.deepcopy(sa)
    img_free, img_ctx, img_mask, txt_free, txt_ctx, txt_mask = make(4)
    out = sa.losses(img_free, img_ctx, img_mask, txt_free, txt_ctx, txt_mask)
    assert set(out) == {"lca", "cra"}
    ic, tc = sa_copy.image_context(img_ctx, img_mask), sa_copy.text_context(txt_ctx, txt_mask)
    want_cra = 3.0 * 0.5 * (
        cra_loss(F.normalize(tc.enhanced, dim=-1), ic.locals, img_mask, 0.5, 9)
        + cra_loss(F.normalize(ic.enhanced, dim=-1), tc.locals, txt_mask, 0.5, 9)
    )
    torch.testing.assert_close(out["cra"], want_cra)
    torch.testing.assert_close(out["lca"], 2.0 * sa_copy.lca(img_free, img_mask, txt_free, txt_mask))
    from_ctx = sa_copy.losses_from(img_free, img_mask, txt_free, txt_mask, ic, tc)
    torch.testing.assert_close(from_ctx["cra"], out["cra"])


def test_disabled_parts() -> None:
    img_free, img_ctx, img_mask, txt_free, txt_ctx, txt_mask = make(5)
    base = torch.randn(6, DIM)
    no_cra = SelfAlign(DIM, AlignConfig(cra=False, codebook_size=8))
    assert no_cra.image_head is None and no_cra.embedding_dim == DIM
    assert no_cra.image_embedding(base, img_ctx, img_mask) is base
    assert no_cra.text_embedding(base, txt_ctx, txt_mask) is base
    assert set(no_cra.losses(img_free, img_ctx, img_mask, txt_free, txt_ctx, txt_mask)) == {"lca"}
    no_lca = SelfAlign(DIM, AlignConfig(lca=False))
    assert no_lca.lca is None
    assert set(no_lca.losses(img_free, img_ctx, img_mask, txt_free, txt_ctx, txt_mask)) == {"cra"}
    no_lca.freeze_codebook(True)  # a no-op without LCA
    no_lca.drop_frozen_grad()


def test_no_parameters_shared_between_modalities() -> None:
    sa = SelfAlign(DIM, AlignConfig(codebook_size=8))
    image_ids = {id(p) for p in sa.image_head.parameters()}
    assert not image_ids & {id(p) for p in sa.text_head.parameters()}


def _step(seed: int, cfg: AlignConfig):
    torch.manual_seed(seed)
    sa = SelfAlign(DIM, cfg)
    img_free, img_ctx, img_mask, txt_free, txt_ctx, txt_mask = make(seed)
    img_free.requires_grad_(True)
    txt_ctx.requires_grad_(True)
    ic, tc = sa.image_context(img_ctx, img_mask), sa.text_context(txt_ctx, txt_mask)
    out = sa.losses_from(img_free, img_mask, txt_free, txt_mask, ic, tc)
    base = F.normalize(torch.randn(img_free.shape[0], DIM), dim=-1)
    ranking = (sa.embed_image(base, ic) @ sa.embed_text(base.flip(0), tc).t()).diagonal().sum()  # trains the fusion MLP
    (sum(out.values()) - ranking).backward()
    grads = [p.grad.clone() for p in sa.parameters()] + [img_free.grad, txt_ctx.grad]
    return {k: v.detach() for k, v in out.items()}, grads


def test_two_runs_under_the_same_seed_are_identical() -> None:
    cfg = AlignConfig(codebook_size=16, lca_direction="symmetric")
    losses_a, grads_a = _step(11, cfg)
    losses_b, grads_b = _step(11, cfg)
    for key in losses_a:
        assert torch.equal(losses_a[key], losses_b[key])
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.equal(ga, gb)


def test_bad_embedding_inputs() -> None:
    sa = SelfAlign(DIM, AlignConfig(codebook_size=8))
    _, img_ctx, img_mask, _, txt_ctx, txt_mask = make(6)
    with pytest.raises(InputError, match="image base"):
        sa.image_embedding(torch.randn(6, DIM + 1), img_ctx, img_mask)
    with pytest.raises(InputError, match="text base"):
        sa.embed_text(torch.randn(6, DIM), None)
    with pytest.raises(InputError, match="context"):
        sa.image_context(img_ctx[..., :3], img_mask)
    cfg = dataclasses.replace(AlignConfig(), cra_negatives=-1)
    with pytest.raises(Exception, match="cra_negatives"):
        SelfAlign(DIM, cfg)
    for name, value in (("lca_weight", -1.0), ("cra_weight", float("nan"))):
        with pytest.raises(Exception, match=f"align.{name}"):
            SelfAlign(DIM, dataclasses.replace(AlignConfig(), **{name: value}))


def test_zero_cra_weight_keeps_the_context_branch_but_not_its_loss() -> None:
    torch.manual_seed(7)
    sa = SelfAlign(DIM, AlignConfig(codebook_size=8, cra_weight=0.0))
    img_free, img_ctx, img_mask, txt_free, txt_ctx, txt_mask = make(7)
    assert sa.embedding_dim == 3 * DIM
    out = sa.losses(img_free, img_ctx, img_mask, txt_free, txt_ctx, txt_mask)
    assert float(out["cra"].detach()) == 0.0
    out["cra"].backward()
    assert all(p.grad is None or not p.grad.any() for p in sa.image_head.parameters())
