"""Word tokenizer and vocabulary for the BiGRU text encoder.

The vocabulary is built from the training captions only (the VSE++ vocabulary once leaked test captions).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from selfalign import atomic
from selfalign.errors import InputError

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation and symbols (emoji included) are dropped."""
    return _WORD.findall(text.lower())


SIDE_WORDS = frozenset({"left", "right", "leftmost", "rightmost"})


def sided_fraction(captions: list[str]) -> float:
    """The fraction of ``captions`` that say left or right: what a left-right flip of the image would contradict."""
    if not captions:
        return 0.0
    return sum(1 for c in captions if SIDE_WORDS.intersection(tokenize(c))) / len(captions)


@dataclass
class TokenBatch:
    """Padded token ids ``ids [B, L]`` with ``mask [B, L]`` (True = a real token) and the token strings."""

    ids: torch.Tensor
    mask: torch.Tensor
    words: list[list[str]]

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(self.ids.to(device), self.mask.to(device), self.words)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(1)


class Vocabulary:
    """Maps words to ids; id 0 is padding and id 1 stands for unknown words."""

    def __init__(self, words: list[str]):
        self.itos = [PAD, UNK] + [w for w in words if w not in (PAD, UNK)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: list[str], min_count: int = 1) -> "Vocabulary":
        counts = Counter(w for c in captions for w in tokenize(c))
        words = sorted(w for w, n in counts.items() if n >= min_count)
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, captions: list[str], max_words: int) -> TokenBatch:
        """Tokenise and pad captions to ``ids [B, L]``; a caption with no word becomes one ``<unk>`` token."""
        words = [tokenize(c)[:max_words] or [UNK] for c in captions]
        length = max(len(w) for w in words)
        ids = torch.zeros(len(words), length, dtype=torch.long)
        for i, ws in enumerate(words):
            ids[i, : len(ws)] = torch.tensor([self.stoi.get(w, 1) for w in ws])
        return TokenBatch(ids, ids != 0, words)

    def save(self, path: str | Path) -> None:
        atomic.write_json(path, {"words": self.itos[2:]})

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        import json

        path = Path(path)
        if not path.is_file():
            raise InputError(f"vocabulary file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(list(data["words"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"vocabulary file {path} is malformed ({exc})") from None
