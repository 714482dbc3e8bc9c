"""benchmarks/retrieval_speed.py and benchmarks/query_encode.py run end to end on a tiny generated store."""

from __future__ import annotations

import json

from conftest import load_benchmark


def test_retrieval_speed_scores_the_test_split_and_one_query_both_ways(feature_store, tmp_path):
    out = tmp_path / "speed.json"
    load_benchmark("retrieval_speed").main(
        ["--features", str(feature_store), "--parts", "test,query", "--test-images", "16", "--scan-subset", "4",
         "--query-sizes", "16,64", "--query-count", "3", "--query-kinds", "flat", "--json", str(out)])
    res = json.loads(out.read_text())
    test = res["test"]
    assert test["images"] == 16 and test["captions"] == 80
    assert test["scan_measured_full"] is True and test["dot_s"] > 0 and test["speedup_scoring"] > 0
    assert [r["gallery"] for r in res["query"]] == [16, 64]
    for row in res["query"]:
        assert row["encode_p50_ms"] > 0 and row["scan_score_ms"] > 0 and row["speedup"] > 0


def test_query_encode_compares_the_gpo_table_with_its_gru(feature_store, tmp_path):
    out = tmp_path / "encode.json"
    load_benchmark("query_encode").main(["--features", str(feature_store), "--repeats", "5", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["gpo_modules"] == 2  # the image and the text encoder pool with GPO
    for modality in ("text", "image"):
        row = res[modality]
        assert row["table_p50_ms"] > 0 and row["gru_p50_ms"] > 0
        assert row["max_abs_diff"] < 1e-5  # the table reproduces the GRU's weights
