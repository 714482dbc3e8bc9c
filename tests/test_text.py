from hypothesis import given, strategies as st

from selfalign.data.text import Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Red circle, left of the BLUE square!") == ["a", "red", "circle", "left", "of", "the", "blue",
                                                                   "square"]
    assert tokenize("a dog's ball 🐶 café") == ["a", "dog's", "ball", "café"]


def test_vocabulary_encode_pads_and_maps_unknown(tmp_path):
    vocab = Vocabulary.build(["a red circle", "a blue square"])
    batch = vocab.encode(["a red square", "zebra", "!!!"], max_words=10)
    assert batch.ids.shape == (3, 3)
    assert batch.mask.tolist() == [[True, True, True], [True, False, False], [True, False, False]]
    assert batch.ids[1, 0] == 1 and batch.ids[2, 0] == 1  # unknown word / empty caption -> <unk>
    vocab.save(tmp_path / "v.json")
    again = Vocabulary.load(tmp_path / "v.json")
    assert again.itos == vocab.itos


@given(st.lists(st.text(max_size=60), min_size=1, max_size=8))
def test_encode_never_produces_an_empty_row(captions):
    vocab = Vocabulary.build(["some words here"])
    batch = vocab.encode(captions, max_words=12)
    assert batch.ids.shape[0] == len(captions)
    assert bool(batch.mask.any(1).all())
    assert batch.ids.shape[1] <= 12
    for row, words in zip(batch.mask, batch.words):
        assert int(row.sum()) == len(words)
