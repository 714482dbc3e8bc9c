"""benchmarks/flickr8k_floor.py: the linear probe trains, scores dev every epoch and reports test at the best one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import load_benchmark


def _load():
    return load_benchmark("flickr8k_floor")


def _planted(mirror: bool = False) -> tuple[dict, dict, dict]:
    """Images of 24 features per split (64 / 16 / 16), five noisy captions each near a planted linear map of the
    image, and (``mirror``) a second, noisy view of every image."""
    torch.manual_seed(0)
    truth = torch.randn(24, 12)
    images, texts, mirrored = {}, {}, {}
    for split, n in (("train", 64), ("dev", 16), ("test", 16)):
        images[split] = torch.randn(n, 24)
        if mirror:
            mirrored[split] = images[split] + 0.2 * torch.randn(n, 24)
        texts[split] = F.normalize((images[split] @ truth).repeat_interleave(5, 0) + 0.3 * torch.randn(5 * n, 12), dim=-1)
    return images, texts, mirrored


def test_probe_learns_a_planted_linear_map():
    floor = _load()
    images, texts, _ = _planted()
    result = floor.train_probe(images, texts, epochs=6, seed=0, lr=1e-2, batch=32)
    assert len(result["dev_rsum_per_epoch"]) == 6
    assert result["best_epoch"] == 1 + result["dev_rsum_per_epoch"].index(max(result["dev_rsum_per_epoch"]))
    assert result["test"]["rsum"] > 400  # chance on 16 images is ~ 100


def test_probe_mirror_views_train_and_score():
    floor = _load()
    images, texts, mirrored = _planted(mirror=True)
    plain = floor.train_probe(images, texts, epochs=4, seed=0, lr=1e-2, batch=32)
    both = floor.train_probe(images, texts, epochs=4, seed=0, lr=1e-2, batch=32, mirrored=mirrored,
                             mirror_train=True, mirror_test=True)
    assert both["test"]["rsum"] > 400 and both["dev_rsum_per_epoch"] != plain["dev_rsum_per_epoch"]


def test_probe_scored_with_a_query_bank_reports_beta_and_test():
    floor = _load()
    images, texts, _ = _planted()
    result = floor.train_probe(images, texts, epochs=3, seed=0, lr=1e-2, batch=32, querybank=True)
    bank = result["querybank"]
    for beta, direction in ((bank["beta_images"], "t2i"), (bank["beta_captions"], "i2t")):
        table = bank["dev"][direction]
        assert table["off" if beta is None else repr(beta)] == max(table.values())
    assert bank["dev"]["rsum_plain"] == result["dev_rsum_per_epoch"][result["best_epoch"] - 1]
    assert bank["dev"]["rsum_chosen"] >= bank["dev"]["rsum_plain"] and bank["test"]["rsum"] > 400
