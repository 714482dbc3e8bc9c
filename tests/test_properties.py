"""Property-based tests (hypothesis): the tokenizer, the caption loaders and the retrieval metric."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from selfalign.data.captions import load_token_dataset
from selfalign.data.formats import load_caption_table
from selfalign.data.precomp import load_feature_split, write_feature_split
from selfalign.data.text import UNK, Vocabulary, tokenize
from selfalign.evaluate.metrics import retrieval_metrics

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any text a caption line can hold: everything but line breaks, NUL and lone surrogates (not encodable in UTF-8).
line_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x00"), max_size=40)
caption = line_text.filter(lambda s: s.strip() != "")


@FAST
@given(st.text(max_size=80))
def test_tokens_are_lowercase_words_of_the_text(text):
    tokens = tokenize(text)
    lowered = text.lower()
    for token in tokens:
        assert token and token in lowered
        assert not any(ch.isspace() for ch in token) and "_" not in token
    assert tokenize(" ".join(tokens)) == tokens  # re-tokenising the tokens changes nothing


@FAST
@given(st.lists(st.text(max_size=60), min_size=1, max_size=6), st.integers(1, 12))
def test_encoding_round_trips_through_the_vocabulary(captions, max_words):
    vocab = Vocabulary.build(captions)
    batch = vocab.encode(captions, max_words)
    assert batch.ids.shape[0] == len(captions) and 1 <= batch.ids.shape[1] <= max_words
    lengths = batch.mask.sum(1)
    assert bool((batch.mask == (batch.ids != 0)).all()) and bool((lengths >= 1).all())
    for row, length, text in zip(batch.ids, lengths.tolist(), captions):
        assert not bool((row[length:] != 0).any())  # valid tokens form a prefix
        decoded = [vocab.itos[i] for i in row[:length].tolist()]
        assert decoded == (tokenize(text)[:max_words] or [UNK])


def _write_token_dataset(root: Path, captions: list[list[str]]) -> tuple[Path, Path, Path]:
    (root / "images").mkdir()
    ids = [f"im{i}.png" for i in range(len(captions))]
    for image_id in ids:
        Image.new("RGB", (2, 2)).save(root / "images" / image_id)
    (root / "split.txt").write_text("".join(f"{i}\n" for i in ids))
    lines = [f"{image_id}#{k}\t{c}" for image_id, caps in zip(ids, captions) for k, c in enumerate(caps)]
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "captions.txt", root / "split.txt", root / "images"


five_captions = st.lists(st.lists(caption, min_size=5, max_size=5), min_size=1, max_size=3)


@FAST
@given(five_captions)
def test_token_file_keeps_every_caption(captions):
    with tempfile.TemporaryDirectory() as tmp:
        split = load_token_dataset(*_write_token_dataset(Path(tmp), captions))
        assert split.captions == [[c.strip() for c in caps] for caps in captions]


@FAST
@given(five_captions, st.sampled_from([".csv", ".jsonl"]))
def test_caption_tables_keep_every_caption(captions, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        rows = []
        for i, caps in enumerate(captions):
            Image.new("RGB", (2, 2)).save(root / "images" / f"im{i}.png")
            rows += [(f"im{i}.png", c) for c in caps]
        table = root / f"captions{suffix}"
        with open(table, "w", encoding="utf-8", newline="") as fh:
            if suffix == ".csv":
                writer = csv.writer(fh, lineterminator="\n")
                writer.writerow(["image", "caption"])
                writer.writerows(rows)
            else:
                fh.writelines(json.dumps({"image": im, "caption": c}) + "\n" for im, c in rows)
        split = load_caption_table(root / "images", table)
        assert split.captions == [[c.strip() for c in caps] for caps in captions]


@FAST
@given(five_captions)
def test_feature_store_captions_round_trip(captions):
    flat = [c for caps in captions for c in caps]
    with tempfile.TemporaryDirectory() as tmp:
        write_feature_split(tmp, "train", np.zeros((len(captions), 1, 2), np.float16), flat,
                            [f"im{i}" for i in range(len(captions))])
        assert load_feature_split(tmp, "train").captions == [c.strip() for c in flat]


def _reference_ranks(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tie rule by definition: positions in a stable descending sort."""
    n = sims.shape[0]
    i2t = np.array([min(int(np.flatnonzero(np.argsort(-sims[i], kind="stable") == j)[0])
                        for j in range(5 * i, 5 * i + 5)) for i in range(n)])
    t2i = np.array([int(np.flatnonzero(np.argsort(-sims[:, j], kind="stable") == j // 5)[0]) for j in range(5 * n)])
    return i2t, t2i


@st.composite
def similarity_matrices(draw):
    n = draw(st.integers(1, 7))
    # small integers make ties common, which is where rank rules differ
    return draw(arrays(np.float32, (n, 5 * n), elements=st.integers(-3, 3).map(float)))


@FAST
@given(similarity_matrices(), st.integers(1, 4))
def test_metric_matches_the_stable_sort_definition(sims, chunk):
    got = retrieval_metrics(sims, chunk_size=chunk)
    i2t, t2i = _reference_ranks(sims)
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            assert abs(got[f"{name}_r{k}"] - 100.0 * np.mean(ranks < k)) < 1e-9
        assert got[f"{name}_medr"] == np.floor(np.median(ranks)) + 1
        assert abs(got[f"{name}_meanr"] - (ranks.mean() + 1)) < 1e-9
    assert got["i2t_r1"] <= got["i2t_r5"] <= got["i2t_r10"] <= 100
    assert abs(got["rsum"] - sum(got[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))) < 1e-9


@FAST
@given(st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_metric_ignores_the_order_of_images_without_ties(n, seed):
    rng = np.random.default_rng(seed)
    sims = rng.normal(size=(n, 5 * n))
    perm = rng.permutation(n)
    shuffled = sims[perm][:, (5 * perm[:, None] + np.arange(5)).ravel()]  # images and their captions together
    a, b = retrieval_metrics(sims), retrieval_metrics(shuffled)
    assert all(abs(a[k] - b[k]) < 1e-9 for k in a)
    assert retrieval_metrics(2.0 * sims) == a  # a positive scale changes no rank
