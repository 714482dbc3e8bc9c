"""The analysis building blocks on hand-made inputs: report merging, codebook statistics, pair picking, mentions."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfalign.analysis.codebook import top_concepts, usage_stats
from selfalign.analysis.common import crop, new_figure, save_figure
from selfalign.analysis.correspondence import mention_position, score_mentions, top_pairs
from selfalign.analysis.report import read_sections, update_section
from selfalign.data.text import tokenize
from selfalign.errors import InputError


def _png(tmp_path, name="f.png"):
    fig, ax = new_figure()
    ax.plot([0, 1], [0, 1])
    return save_figure(fig, tmp_path / "figs" / name)


def test_report_sections_are_added_replaced_and_kept(tmp_path):
    report = tmp_path / "out" / "report.html"
    fig = _png(tmp_path)
    update_section(report, "one", "First <b>", "selfalign analyze curves r1", "<p>body 1</p>", [fig])
    update_section(report, "two", "Second", "selfalign analyze codebook r2", "<p>body 2</p>")
    update_section(report, "one", "First again", "selfalign analyze curves r1 --out x", "<p>new body</p>", [fig])
    sections = read_sections(report)
    assert list(sections) == ["one", "two"]  # replaced in place, order kept
    assert "new body" in sections["one"] and "body 1" not in sections["one"]
    assert "First &lt;b&gt;" not in sections["one"] and "First again" in sections["one"]
    assert "selfalign analyze curves r1 --out x" in sections["one"]
    assert 'src="../figs/f.png"' in sections["one"]  # relative to the report's folder
    assert not list(report.parent.glob("*.tmp"))


def test_report_embeds_figures_and_rejects_bad_ids(tmp_path):
    report = tmp_path / "report.html"
    update_section(report, "emb", "Embedded", "cmd", "", [_png(tmp_path)], embed=True)
    assert 'src="data:image/png;base64,iVBORw0KGgo' in report.read_text()
    with pytest.raises(InputError, match="section id"):
        update_section(report, "bad id -->", "x", "cmd")


def test_concurrent_section_updates_are_all_kept(tmp_path):
    report = tmp_path / "report.html"
    threads = [threading.Thread(target=update_section, args=(report, f"s{i}", f"S{i}", f"cmd {i}")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(read_sections(report)) == [f"s{i}" for i in range(8)]


def test_usage_stats_perplexity_and_dead_codes():
    even = usage_stats(np.arange(8).repeat(3), 8)
    assert math.isclose(even["perplexity"], 8.0, rel_tol=1e-6) and even["dead"] == 0
    collapsed = usage_stats(np.zeros(50, dtype=int), 8)
    assert collapsed["perplexity"] == 1.0 and collapsed["dead"] == 7 and collapsed["used"] == 1
    half = usage_stats(np.array([0, 1, 0, 1]), 4)
    assert math.isclose(half["perplexity"], 2.0, rel_tol=1e-6) and half["counts"] == [2, 2, 0, 0]
    assert usage_stats(np.array([], dtype=int), 4)["perplexity"] == 1.0


def test_top_concepts_ranks_by_load_and_lists_words_and_best_regions():
    assigned = {"size": 4, "word_codes": np.array([2, 2, 2, 1]), "words": ["red", "red", "circle", "blue"],
                "region_codes": np.array([2, 1, 2, 2]), "region_scores": np.array([0.1, 0.9, 0.8, 0.5]),
                "region_refs": np.array([[0, 1], [0, 2], [1, 1], [1, 3]])}
    concepts = top_concepts(assigned, top=3, n_words=2, n_crops=2)
    assert [c["concept"] for c in concepts] == [2, 1]  # concepts 0 and 3 are unused
    assert concepts[0]["words"] == [("red", 2), ("circle", 1)]
    assert [(r["image"], r["region"]) for r in concepts[0]["regions"]] == [(1, 1), (1, 3)]  # best cosines first
    word_heavy = {"size": 3, "word_codes": np.array([0, 0, 0, 0, 0, 1]), "words": ["a"] * 5 + ["red"],
                  "region_codes": np.array([1]), "region_scores": np.array([0.5]), "region_refs": np.array([[0, 1]])}
    assert [c["concept"] for c in top_concepts(word_heavy, top=3)] == [1, 0]  # shared concepts first


def test_top_pairs_one_per_word_and_without_the_whole_image():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.95, 0.7, 0.6], [0.0, 0.0, 0.99]])
    words = ["the", "red", "the", "pad"]
    pairs = top_pairs(sim, torch.tensor([True, True, True, False]), torch.tensor([True, True, True]), words, k=5)
    assert [(p["word"], p["region"]) for p in pairs] == [("red", 1), ("the", 1)]  # region 0 excluded, 'pad' invalid
    only_whole = top_pairs(sim, torch.ones(4, dtype=torch.bool), torch.tensor([True, False, False]), words, k=1)
    assert only_whole[0]["region"] == 0  # nothing else to point at


def test_mention_position_counts_repeated_words():
    text = "a red circle left of a red square"
    words = tokenize(text)
    assert mention_position(text, text.index("red"), "red", words) == 1
    assert mention_position(text, text.rindex("red"), "red", words) == 6
    assert mention_position(text, text.index("square"), "square", words[:5]) is None  # truncated away
    pieces = ["[CLS]", "a", "red", "circle", "[SEP]"]  # sub-word tokenizers: the n-th equal token
    assert mention_position("a red circle", 2, "red", pieces) == 2


def _scene(n_obj: int, captions: list[tuple[str, list[tuple[str, str, int]]]]) -> dict:
    caps = []
    for text, mentions in captions:
        caps.append({"text": text, "mentions": [{"word": w, "kind": kind, "object": obj, "start": text.index(w)}
                                                for w, kind, obj in mentions]})
    return {"objects": [{}] * n_obj, "captions": caps}


def test_score_mentions_with_planted_answers():
    torch.manual_seed(0)
    d = 16
    caption = "a red circle and a blue square"
    mentions = [("red", "color", 0), ("circle", "shape", 0), ("blue", "color", 1), ("square", "shape", 1)]
    annotations = {"img": _scene(2, [(caption, mentions)] * 5)}
    words = [tokenize(caption)] * 5
    txt = F.normalize(torch.randn(1, len(words[0]), d), dim=-1).repeat(5, 1, 1)
    img = torch.zeros(1, 3, d)
    # region 1 = object 0 carries the words that name object 0, region 2 the others; region 0 would win if allowed
    img[0, 1] = F.normalize(txt[:, 1] + txt[:, 2], dim=-1).mean(0)
    img[0, 2] = F.normalize(txt[:, 5] + txt[:, 6], dim=-1).mean(0)
    img[0, 0] = 10 * (img[0, 1] + img[0, 2])
    got = score_mentions(img, torch.ones(1, 3, dtype=torch.bool), txt, torch.ones(5, 7, dtype=torch.bool), words,
                         [caption] * 5, ["img"], annotations)
    assert got["accuracy"] == 1.0 and got["scored"] == 20 and got["chance"] == 0.5
    swapped = score_mentions(img[:, [0, 2, 1]], torch.ones(1, 3, dtype=torch.bool), txt,
                             torch.ones(5, 7, dtype=torch.bool), words, [caption] * 5, ["img"], annotations)
    assert swapped["accuracy"] == 0.0


def test_score_mentions_counts_what_it_skips():
    caption = "a red circle"
    annotations = {"img": _scene(1, [(caption, [("red", "color", 0), ("circle", "shape", 0)])] * 5)}
    words = [["a", "red"]] * 5  # 'circle' truncated away
    got = score_mentions(torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), torch.randn(5, 2, 4),
                         torch.ones(5, 2, dtype=torch.bool), words, [caption] * 4 + ["another caption"],
                         ["img"], annotations)
    assert got["scored"] == 4 and got["accuracy"] == 1.0  # one object: always right
    assert got["skipped"]["unmapped_word"] == 4 and got["skipped"]["caption_mismatch"] == 1
    bad = {"img": {"objects": [{}], "captions": [{"text": caption, "mentions": [{"word": "red"}]}]}}
    with pytest.raises(InputError, match="malformed mention"):
        score_mentions(torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), torch.randn(5, 2, 4),
                       torch.ones(5, 2, dtype=torch.bool), words, [caption] * 5, ["img"], bad)


def test_crop_uses_normalised_boxes():
    from PIL import Image

    image = Image.new("RGB", (100, 50), "white")
    image.paste((255, 0, 0), (50, 0, 100, 25))
    piece = crop(image, np.array([0.5, 0.0, 1.0, 0.5]), size=8)
    assert piece.size == (8, 8) and piece.getpixel((4, 4)) == (255, 0, 0)


def test_target_entropy_is_uniform_for_unrelated_prototypes_and_low_for_matching_ones():
    import math

    import torch
    import torch.nn.functional as F

    from selfalign.analysis.codebook import target_entropy

    torch.manual_seed(0)
    protos = F.normalize(torch.randn(64, 32), dim=1)
    # regions far from every prototype's direction: a common offset dominates, so the codes are nearly flat
    flat = F.normalize(torch.randn(512, 32) * 0.01 + F.normalize(torch.randn(32), dim=0), dim=1)
    sharp = F.normalize(protos[torch.arange(512) % 64] + 0.05 * torch.randn(512, 32), dim=1)
    uniform = target_entropy(flat, protos, 0.05, 3)
    peaked = target_entropy(sharp, protos, 0.05, 3)
    assert uniform["uniform"] == round(math.log(64), 4)
    assert uniform["mean_entropy"] > 0.95 * math.log(64)
    assert peaked["mean_entropy"] < 0.5 * math.log(64)
    assert peaked["mean_best_cosine"] > 0.9
