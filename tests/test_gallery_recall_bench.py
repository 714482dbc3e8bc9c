"""benchmarks/gallery_recall.py: recall through the search path equals the protocol's on a flat gallery."""

from __future__ import annotations

import pytest

from conftest import load_benchmark

def _bench():
    return load_benchmark("gallery_recall")


def test_text_recall_through_the_gallery_is_the_protocols(tiny_gallery, tiny_scenes_run):
    from selfalign.pipeline import evaluate_run

    row = _bench().measure(str(tiny_gallery), text_queries=0, image_queries=-1)
    expected = evaluate_run(tiny_scenes_run["run_dir"], "test", device="cpu", features=tiny_scenes_run["features"])
    assert row["t2i_queries"] == 40 and row["i2t_queries"] == 8
    for k in (1, 5, 10):
        assert row[f"t2i_r{k}"] == pytest.approx(expected[f"t2i_r{k}"], abs=0.01)
    # image queries re-extract each photo: the same regions as the store up to float16 rounding
    assert row["i2t_r10"] == pytest.approx(expected["i2t_r10"], abs=12.5)
    assert row["t2i_p50_ms"] > 0 and row["i2t_p99_ms"] >= row["i2t_p50_ms"]
    assert "| t2i R@1 |" in _bench().table([row])
