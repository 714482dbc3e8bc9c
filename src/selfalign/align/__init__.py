"""SelfAlign (arXiv 2308.14009) as a module any dual encoder can plug in.

It needs, per modality, context-free locals ``free [B, L, d]`` (L2-normalised; LCA), contextual locals
``context [B, L, d]`` (CRA) and ``mask [B, L]`` (True = valid), plus the pooled base embedding ``[B, d]``.
Image pair ``i`` of a batch must be paired with caption ``i``. Example with your own encoders::

    from selfalign.align import SelfAlign
    from selfalign.config import AlignConfig

    sa = SelfAlign(dim=512, cfg=AlignConfig(lca_direction="text_to_image"))
    ic = sa.image_context(img_ctx, img_mask)               # heads once per step
    tc = sa.text_context(txt_ctx, txt_mask)
    img_emb = sa.embed_image(img_base, ic)                 # [B, 1536]; score = img_emb @ txt_emb.T
    txt_emb = sa.embed_text(txt_base, tc)
    loss = ranking_loss(img_emb @ txt_emb.T) + sum(sa.losses_from(img_free, img_mask, txt_free, txt_mask, ic, tc).values())
    loss.backward(); sa.drop_frozen_grad(); optimizer.step()   # drop_frozen_grad: only matters after sa.freeze_codebook()

At retrieval, ``sa.image_embedding(base, context, mask)`` / ``sa.text_embedding(...)`` (``sa.eval()``) give the
embeddings to index; the LCA codebook is training-only (``sa.lca.assign`` maps features to concept ids).
"""

from selfalign.align.cra import ContextHead, ContextOutput, cra_loss
from selfalign.align.lca import LCA
from selfalign.align.selfalign import SelfAlign
from selfalign.align.sinkhorn import sinkhorn

__all__ = ["LCA", "ContextHead", "ContextOutput", "SelfAlign", "cra_loss", "sinkhorn"]
