"""The SCAN cross-attention baseline as a model kind: trained by the same trainer, evaluated by the same protocol."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from selfalign.cli import main
from selfalign.config import load_config
from selfalign.data.precomp import load_feature_split
from selfalign.data.text import Vocabulary
from selfalign.errors import ConfigError
from selfalign.evaluate.metrics import retrieval_metrics
from selfalign.evaluate.runner import encode_split, score_embeddings
from selfalign.model.checkpoint import build_model, load_model
from selfalign.pipeline import evaluate_run


@pytest.fixture(scope="module")
def scan_run(feature_store, tmp_path_factory, torch_one_thread):
    """A SCAN run trained by ``selfalign train`` (3 short epochs) on the tiny store."""
    out = tmp_path_factory.mktemp("scan_runs")
    config = out / "c.yaml"
    config.write_text("model:\n  scan_pooling: lse\n")
    overrides = tiny_overrides(feature_store, out, "scan") + ["model.similarity=scan", "train.epochs=3"]
    assert main(["train", str(config), *overrides, "--quiet"]) == 0
    return out / "scan"


def test_scan_run_trains_and_evaluates_with_the_protocol(scan_run):
    saved = json.loads((scan_run / "config.json").read_text())
    assert saved["model"]["similarity"] == "scan" and saved["model"]["scan_pooling"] == "lse"
    rows = list(csv.DictReader(open(scan_run / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert "loss_lca" not in rows[0] and "loss_cra" not in rows[0]  # SelfAlign is off for SCAN runs
    assert float(rows[-1]["loss_rank"]) < float(rows[0]["loss_rank"])
    assert all(math.isfinite(float(r["dev_rsum"])) for r in rows)
    model, cfg = load_model(scan_run)
    assert model.align is None and cfg.align.lca  # the config asks for SelfAlign; the SCAN model ignores it
    metrics = evaluate_run(scan_run, "test", device="cpu")
    assert metrics["similarity"] == "scan"
    assert metrics["rsum"] > 150  # chance is ~12 rsum points on 16 images
    assert json.loads((scan_run / "eval.json").read_text())["rsum"] == metrics["rsum"]


@pytest.mark.parametrize("pooling", ["lse", "mean"])
def test_split_scores_equal_a_per_pair_loop(feature_store, pooling, torch_one_thread):
    """Batched, chunked, padded evaluation == one image, one caption, one SCAN call at a time."""
    cfg = load_config(None, tiny_overrides(feature_store, feature_store / "unused") + [
        "model.similarity=scan", f"model.scan_pooling={pooling}", "model.scan_lambda_softmax=4.0"])
    split = load_feature_split(feature_store, "test")
    torch.manual_seed(0)
    model = build_model(cfg, Vocabulary.build(list(split.captions))).eval()
    n = 6
    emb = encode_split(model, split, max_images=n, batch_size=4)  # batches force padding across batches
    loc = emb.locals
    assert loc is not None and loc.images.shape[0] == n and loc.captions.shape[0] == 5 * n
    batched = loc.score(loc.images, loc.image_mask, loc.captions, loc.caption_mask)

    masks = split.region_mask()
    loop = torch.zeros(n, 5 * n)
    with torch.inference_mode():
        images = [model.encode_image(torch.from_numpy(np.asarray(split.images[i:i + 1], np.float32)),
                                     torch.as_tensor(masks[i:i + 1])) for i in range(n)]
        texts = [model.encode_text(model.tokenize([split.captions[j]])) for j in range(5 * n)]
        for i in range(n):
            for j in range(5 * n):
                loop[i, j] = model.similarity(images[i], texts[j])[0, 0]
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=1e-5)
    metrics = score_embeddings(emb)
    expected = retrieval_metrics(loop.numpy())
    assert metrics["rsum"] == pytest.approx(expected["rsum"])


def test_dot_similarity_is_the_embedding_product(feature_store):
    cfg = load_config(None, tiny_overrides(feature_store, feature_store / "unused"))
    split = load_feature_split(feature_store, "test")
    model = build_model(cfg, Vocabulary.build(list(split.captions))).eval()
    assert model.align is not None
    emb = encode_split(model, split, max_images=4)
    assert emb.locals is None
    with torch.inference_mode():
        image = model.encode_image(torch.from_numpy(np.asarray(split.images[:4], np.float32)),
                                   torch.as_tensor(split.region_mask()[:4]))
        text = model.encode_text(model.tokenize(list(split.captions[:20])))
        torch.testing.assert_close(model.similarity(image, text), image.embedding @ text.embedding.T)
        torch.testing.assert_close(model.similarity(image, text), emb.images @ emb.captions.T, rtol=1e-5,
                                   atol=1e-5)


def test_gathered_scan_similarity_pads_captions(feature_store):
    """A gather that returns the rows unchanged (one process) gives the plain scores, whatever the caption width."""
    cfg = load_config(None, tiny_overrides(feature_store, feature_store / "unused") + ["model.similarity=scan"])
    split = load_feature_split(feature_store, "test")
    model = build_model(cfg, Vocabulary.build(list(split.captions))).eval()
    with torch.inference_mode():
        image = model.encode_image(torch.from_numpy(np.asarray(split.images[:3], np.float32)),
                                   torch.as_tensor(split.region_mask()[:3]))
        text = model.encode_text(model.tokenize(list(split.captions[:7])))
        plain = model.similarity(image, text)
        seen = []
        gathered = model.similarity(image, text, lambda x: seen.append(x.shape) or x)
    assert plain.shape == (3, 7)
    torch.testing.assert_close(plain, gathered)
    assert len(seen) == 6  # width, locals and mask for each modality


@pytest.mark.parametrize("override, key", [("model.scan_lambda_lse=0", "model.scan_lambda_lse"),
                                           ("model.scan_lambda_softmax=-1", "model.scan_lambda_softmax"),
                                           ("model.similarity=cosine", "model.similarity"),
                                           ("model.scan_pooling=max", "model.scan_pooling")])
def test_bad_scan_settings_name_the_key(feature_store, override, key):
    with pytest.raises(ConfigError, match=key):
        cfg = load_config(None, tiny_overrides(feature_store, feature_store / "unused") +
                          ["model.similarity=scan", override])
        build_model(cfg, Vocabulary.build(["a red star"]))


def test_zero_padding_gives_finite_gradients():
    """The encoders zero their padded locals; SCAN's normalisation must not turn those zeros into NaN gradients."""
    from selfalign.crossattn import scan_t2i_scores

    regions = torch.randn(2, 3, 8)
    regions[0, 2] = 0.0
    words = torch.randn(2, 5, 8)
    words[1, 3:] = 0.0
    regions.requires_grad_(True)
    words.requires_grad_(True)
    rmask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    wmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    scan_t2i_scores(regions, rmask, words, wmask).sum().backward()
    assert torch.isfinite(regions.grad).all() and torch.isfinite(words.grad).all()
    assert (regions.grad[0, 2] == 0).all() and (words.grad[1, 3:] == 0).all()


def test_single_query_route_equals_the_gram_route():
    """One short caption forms the attended contexts; many captions use the Gram matrices: same scores."""
    from selfalign.crossattn import scan_t2i_scores

    g = torch.Generator().manual_seed(7)
    regions = torch.randn(9, 10, 64, generator=g, dtype=torch.float64)
    words = torch.randn(40, 3, 64, generator=g, dtype=torch.float64)
    rmask = torch.arange(10)[None] < torch.randint(1, 11, (9,), generator=g)[:, None]
    full = scan_t2i_scores(regions, rmask, words, None)  # 120 words x 54 >= 10 x 64: Gram route
    for j in (0, 17, 39):
        one = scan_t2i_scores(regions, rmask, words[j:j + 1], None)  # 3 words: the contexts are formed
        torch.testing.assert_close(one[:, 0], full[:, j], rtol=1e-10, atol=1e-10)


def _scan_worker(rank: int, size: int, port: int, features, tmp) -> None:
    import os
    import sys

    from selfalign import distributed as D
    from test_distributed import _step

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    sys.stdout = open(tmp / f"stdout{rank}.txt", "w")
    world = D.init_distributed("cpu")
    try:
        steps = {hardest: _step(features, tmp, ["model.similarity=scan"], rank, size, hardest)
                 for hardest in (False, True)}
        if rank == 0:
            torch.save(steps, tmp / "scan_steps.pt")
    finally:
        D.shutdown(world)


def test_two_process_scan_step_matches_one_process(tmp_path):
    """Data-parallel SCAN: locals (captions of different widths per rank) are gathered, so 2 ranks == 1."""
    import torch.multiprocessing as mp

    from conftest import make_feature_store
    from test_distributed import _max_diff, _port, _step

    features = make_feature_store(tmp_path / "features", n_train=32, n_dev=8, n_test=8)
    mp.spawn(_scan_worker, args=(2, _port(), features, tmp_path), nprocs=2, join=True)
    steps = torch.load(tmp_path / "scan_steps.pt", weights_only=False)
    for hardest in (False, True):
        parts2, grads2 = steps[hardest]
        parts1, grads1 = _step(features, tmp_path, ["model.similarity=scan"], 0, 1, hardest)
        assert parts1.keys() == parts2.keys() == {"rank"}
        assert parts2["rank"] == pytest.approx(parts1["rank"], rel=1e-5, abs=1e-6)
        scale = max(float(g.abs().max()) for g in grads1.values())
        assert _max_diff(grads1, grads2) <= 3e-5 * scale


def test_prenormalised_gallery_gives_the_same_scores():
    from selfalign.crossattn import scan_t2i_scores

    g = torch.Generator().manual_seed(8)
    regions = torch.randn(6, 5, 16, generator=g, dtype=torch.float64)
    words = torch.randn(4, 7, 16, generator=g, dtype=torch.float64)
    wmask = torch.arange(7)[None] < torch.tensor([[7], [2], [5], [1]])
    unit = regions / (regions.norm(dim=2, keepdim=True) + 1e-8)
    unit_words = words / (words.norm(dim=2, keepdim=True) + 1e-8)
    torch.testing.assert_close(scan_t2i_scores(unit, None, unit_words, wmask, normalized=True),
                               scan_t2i_scores(regions, None, words, wmask), rtol=1e-10, atol=1e-10)


def test_a_scan_run_cannot_be_indexed(scan_run, tmp_path):
    from selfalign.errors import InputError
    from selfalign.index.gallery_build import build_gallery

    with pytest.raises(InputError, match="model.similarity=scan"):
        build_gallery(scan_run, tmp_path / "gallery", images=tmp_path, progress=False)
