"""Query-bank normalisation: the discount, its effect on hubs, the bank file, building and scoring with it."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from selfalign.cli import main
from selfalign.config import load_config
from selfalign.errors import InputError
from selfalign.evaluate.metrics import i2t_ranks, protocol_metrics, retrieval_metrics, t2i_ranks
from selfalign.evaluate.querybank import (
    BANK_FILE, QueryBank, bank_discount, choose_betas, normalised_sims, sample_rows,
)  # fmt: skip
from selfalign.model.checkpoint import model_hash
from selfalign.pipeline import build_querybank, evaluate_run
from selfalign.train import train


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_bank_discount_is_the_scaled_logsumexp_whatever_the_chunk():
    gen = torch.Generator().manual_seed(0)
    bank, items = torch.randn(50, 8, generator=gen), torch.randn(23, 8, generator=gen)
    expected = torch.logsumexp(4.0 * bank @ items.T, dim=0) / 4.0
    for chunk in (1, 5, 23, 100):
        assert torch.allclose(bank_discount(bank, items, 4.0, chunk=chunk), expected, atol=1e-5)
    with pytest.raises(InputError, match="positive"):
        bank_discount(bank, items, 0.0)


def test_each_discount_changes_only_the_other_direction():
    gen = torch.Generator().manual_seed(1)
    sims = torch.randn(6, 30, generator=gen)
    i2t, t2i = normalised_sims(sims, torch.randn(6, generator=gen), torch.randn(30, generator=gen))
    # an image's discount is constant along its row: image->text ranks of that image cannot change, and so on
    assert np.array_equal(t2i_ranks(sims.numpy()), t2i_ranks(i2t.numpy()))
    assert np.array_equal(i2t_ranks(sims.numpy()), i2t_ranks(t2i.numpy()))
    assert not np.array_equal(t2i_ranks(sims.numpy()), t2i_ranks(t2i.numpy()))


def test_metrics_rank_text_to_image_on_the_second_matrix():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 50)), rng.normal(size=(10, 50))
    mixed = retrieval_metrics(a, t2i_sims=b)
    assert mixed["i2t_r1"] == retrieval_metrics(a)["i2t_r1"] and mixed["t2i_r5"] == retrieval_metrics(b)["t2i_r5"]
    folds = protocol_metrics(a, fold5=True, t2i_sims=b)
    assert folds["t2i_r1"] == pytest.approx(np.mean([retrieval_metrics(b[2 * f:2 * f + 2, 10 * f:10 * f + 10])[
        "t2i_r1"] for f in range(5)]))
    with pytest.raises(InputError, match="t2i_sims has shape"):
        retrieval_metrics(a, t2i_sims=b[:8, :40])


def _hub_problem(seed: int, n: int = 60, dim: int = 16):
    """Images, 5 captions each near their image, and a bank drawn like the captions; a few images are hubs: pulled
    towards the direction every caption shares, so they score high for everyone."""
    gen = torch.Generator().manual_seed(seed)
    common = _unit(torch.randn(dim, generator=gen))
    images = _unit(torch.randn(n, dim, generator=gen))
    images[:6] = _unit(images[:6] + 2.5 * common)

    def captions_of(imgs):
        noise = torch.randn(len(imgs), 5, dim, generator=gen)
        return _unit(imgs[:, None] + 0.25 * noise + 0.8 * common).reshape(-1, dim)

    bank_images = _unit(torch.randn(300, dim, generator=gen))
    return images, captions_of(images), captions_of(bank_images), bank_images


def test_normalisation_demotes_hubs_and_lifts_recall():
    images, captions, bank_captions, bank_images = _hub_problem(3)
    sims = images @ captions.T
    plain = retrieval_metrics(sims.numpy())
    i2t, t2i = QueryBank(bank_captions, bank_images, 10.0, 10.0).normalise(sims, images, captions)
    normed = retrieval_metrics(i2t.numpy(), t2i_sims=t2i.numpy())
    assert normed["t2i_r1"] > plain["t2i_r1"] + 15  # hubs no longer take the top of other captions' lists
    hub_top1 = lambda s: np.isin(s.argmax(dim=0).numpy(), np.arange(6)).mean()  # noqa: E731
    assert hub_top1(t2i) < hub_top1(sims)
    beta_images, beta_captions, table = choose_betas(images, captions, bank_captions, bank_images, (1.0, 10.0, 1e4))
    assert table["rsum_plain"] == pytest.approx(plain["rsum"])
    assert set(table["t2i"]) == {"off", "1.0", "10.0", "10000.0"} and beta_images is not None
    assert table["t2i"][repr(beta_images)] == max(table["t2i"].values()) > table["t2i"]["off"]
    chosen = table["i2t"]["off" if beta_captions is None else repr(beta_captions)]
    assert chosen == max(table["i2t"].values())
    assert table["rsum_chosen"] == pytest.approx(table["t2i"][repr(beta_images)] + chosen)


def test_a_direction_the_bank_does_not_help_stays_unnormalised():
    """A bank of queries unlike the test's (here: random directions) cannot improve dev recall: both directions
    are left off, and an off direction's discount is zero."""
    gen = torch.Generator().manual_seed(5)
    images = _unit(torch.randn(30, 16, generator=gen))
    captions = _unit(images.repeat_interleave(5, 0) + 0.05 * torch.randn(150, 16, generator=gen))
    bank = _unit(torch.randn(200, 16, generator=gen))
    beta_images, beta_captions, table = choose_betas(images, captions, bank, bank, (1.0, 10.0))
    assert (beta_images, beta_captions) == (None, None) and table["rsum_chosen"] == table["rsum_plain"]
    off = QueryBank(bank, bank, None, 3.0)
    assert torch.equal(off.image_discount(images), torch.zeros(30)) and off.caption_discount(captions).abs().sum() > 0


def test_sample_rows_draws_a_sorted_reproducible_subset():
    assert np.array_equal(sample_rows(5, 0, 1), np.arange(5)) and np.array_equal(sample_rows(5, 9, 1), np.arange(5))
    rows = sample_rows(100, 10, 4)
    assert len(set(rows.tolist())) == 10 and np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, sample_rows(100, 10, 4)) and not np.array_equal(rows, sample_rows(100, 10, 5))


def test_bank_file_round_trip_and_errors(tmp_path):
    bank = QueryBank(torch.randn(7, 4), torch.randn(3, 4), 7.5, None, {"model_hash": "abc", "split": "train"})
    bank.save(tmp_path)
    back = QueryBank.load(tmp_path, "abc")
    assert (back.beta_images, back.beta_captions) == (7.5, None) and back.info["split"] == "train"
    assert torch.equal(back.captions, bank.captions)
    with pytest.raises(InputError, match="another model"):
        QueryBank.load(tmp_path, "def")
    (tmp_path / BANK_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a query bank"):
        QueryBank.load(tmp_path)
    with pytest.raises(InputError, match="selfalign querybank"):
        QueryBank.load(tmp_path / "elsewhere")


@pytest.fixture(scope="module")
def tiny_run(feature_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("qb")
    return train(load_config(None, tiny_overrides(feature_store, out, "qb")), progress=False)


def test_build_querybank_then_evaluate_with_it(tiny_run):
    report = build_querybank(tiny_run, max_captions=40, max_images=0, betas=(2.0, 20.0), device="cpu")
    assert report["captions"] == 40 and report["images"] == report["images_total"]
    assert set(report["dev"]["t2i"]) == {"off", "2.0", "20.0"}
    assert report["saved"] and report["beta_images"] in (2.0, 20.0)  # the tiny run's hubs: see the CLI test
    bank = QueryBank.load(tiny_run, model_hash(tiny_run))
    assert bank.captions.shape[0] == 40 and bank.info["dev_split"] == "dev"
    metrics = evaluate_run(tiny_run, "test", device="cpu", querybank=True)
    assert metrics["querybank"]["beta_images"] == report["beta_images"]
    assert json.loads((tiny_run / "eval_querybank.json").read_text())["rsum"] == metrics["rsum"]
    with pytest.raises(InputError, match="drawn from the 'train' split"):
        evaluate_run(tiny_run, "train", device="cpu", querybank=True)
    with pytest.raises(InputError, match="both 'dev'"):
        build_querybank(tiny_run, split="dev", device="cpu")



def test_a_measurement_where_no_beta_helps_removes_the_earlier_bank(tiny_run, monkeypatch):
    import selfalign.evaluate.querybank as querybank

    assert build_querybank(tiny_run, betas=(2.0, 20.0), device="cpu")["saved"] and QueryBank.exists(tiny_run)
    table = {"t2i": {"off": 1.0}, "i2t": {"off": 1.0}, "rsum_plain": 2.0, "rsum_chosen": 2.0}
    monkeypatch.setattr(querybank, "choose_betas", lambda *args, **kwargs: (None, None, table))
    report = build_querybank(tiny_run, device="cpu")
    assert not report["saved"] and report["removed"] and not QueryBank.exists(tiny_run)
    with pytest.raises(InputError, match="selfalign querybank"):
        evaluate_run(tiny_run, "test", device="cpu", querybank=True)


def test_querybank_cli(tiny_run, capsys):
    assert main(["querybank", str(tiny_run), "--captions", "30", "--betas", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "dev text->image R@1+R@5+R@10 by beta: off: " in out and "beta 5 for images" in out
    assert "bank of 30 captions" in out
    assert main(["evaluate", str(tiny_run), "--querybank", "--device", "cpu"]) == 0
    assert "query-bank normalised: beta 5 for images" in capsys.readouterr().out
    assert main(["evaluate", "--sims", "s.npy", "--querybank"]) == 2
    assert "already scored" in capsys.readouterr().err
    assert main(["querybank", str(tiny_run), "--betas", "5,x"]) == 2
    assert "--betas" in capsys.readouterr().err


def test_an_ensemble_averages_each_runs_normalised_scores(tiny_run, feature_store, tmp_path):
    from selfalign.evaluate.runner import encode_split, similarity_matrix
    from selfalign.data.precomp import load_feature_split
    from selfalign.model.checkpoint import load_model
    from selfalign.pipeline import evaluate_ensemble

    other = train(load_config(None, tiny_overrides(feature_store, tmp_path, "qb2") + ["train.seed=1"]),
                  progress=False)
    i2t, t2i, banks = 0, 0, []
    for run, beta in ((tiny_run, 2.0), (other, 8.0)):
        assert build_querybank(run, betas=(beta,), device="cpu")["saved"]
        banks.append(QueryBank.load(run))
        emb = encode_split(load_model(run, "cpu")[0], load_feature_split(feature_store, "test"))
        a, b = banks[-1].normalise(similarity_matrix(emb), emb.images, emb.captions)
        i2t, t2i = i2t + a / 2, t2i + b / 2
    expected = retrieval_metrics(i2t.numpy(), t2i_sims=t2i.numpy())
    metrics = evaluate_ensemble([tiny_run, other], "test", device="cpu", querybank=True)
    assert metrics["querybank"]["runs"] == [bank.describe() for bank in banks]
    assert {banks[0].beta_images, banks[1].beta_images} <= {2.0, 8.0, None}
    for key in ("i2t_r1", "t2i_r1", "t2i_r5", "rsum"):
        assert metrics[key] == pytest.approx(expected[key])
