"""Issue 4's floor: a linear map from frozen whole-image features to frozen MiniLM sentence vectors.

    python benchmarks/flickr8k_floor.py --features features/flickr8k/grid [--epochs 20] [--seeds 0,1,2] [--mirror train,test]
        [--querybank]

No regions, no SelfAlign, no fine-tuning: region 0 of each image (the mean of the EfficientNet-Lite0 feature map,
1280-d) goes through one linear layer into the 384-d space of all-MiniLM-L6-v2's sentence vectors (masked mean of
the token features, L2-normalised, as sentence-transformers pools them), trained with the VSE++ loss (sum of
violations in the first epoch, then the hardest negative) and dropout 0.2 on both inputs. Each epoch is scored on
the dev split; the test split is scored once, with the epoch that was best on dev. This is the number the full
model has to beat: it shows what the frozen features give on their own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selfalign import atomic
from selfalign.data.precomp import load_feature_split, load_mirror_split
from selfalign.evaluate.metrics import retrieval_metrics
from selfalign.evaluate.querybank import QueryBank, choose_betas, sample_rows
from selfalign.losses import hinge_triplet_loss
from selfalign.model.gpo import masked_mean
from selfalign.model.text_encoder import MiniLMTextEncoder

KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


@torch.no_grad()
def sentence_vectors(encoder: MiniLMTextEncoder, captions: list[str], batch: int = 256) -> torch.Tensor:
    """``[N, 384]`` unit sentence vectors: the masked mean of MiniLM's last hidden states (shortest first, fast)."""
    order = np.argsort([len(c) for c in captions], kind="stable")
    out = torch.zeros(len(captions), encoder.transformer.config.hidden_size)
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        tokens = encoder.tokenize([captions[i] for i in idx])
        hidden = encoder.transformer(input_ids=tokens.ids, attention_mask=tokens.mask.long()).last_hidden_state
        out[torch.from_numpy(idx)] = F.normalize(masked_mean(hidden, tokens.mask), dim=-1)
    return out


def train_probe(images: dict, texts: dict, epochs: int, seed: int, lr: float, batch: int,
                mirrored: dict | None = None, mirror_train: bool = False, mirror_test: bool = False,
                querybank: bool = False) -> dict:
    """Fit the linear map; returns the dev curve and the test metrics at the best dev epoch.

    ``mirrored``: the whole-image features of the mirrored images, per split; ``mirror_train`` trains each pair on
    its image's mirrored copy with probability 1/2, ``mirror_test`` scores the normalised mean of both views.
    ``querybank``: also score that epoch's map with a query bank, as ``selfalign querybank`` builds one (10,000
    training captions, 5,000 training images, each direction's beta chosen on dev): the floor for
    query-bank-normalised models.
    """
    torch.manual_seed(seed)
    probe = torch.nn.Linear(images["train"].shape[1], texts["train"].shape[1])

    def embed(split: str) -> torch.Tensor:
        out = F.normalize(probe(images[split]), dim=-1)
        return F.normalize(out + F.normalize(probe(mirrored[split]), dim=-1), dim=-1) if mirror_test else out

    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    drop = torch.nn.Dropout(0.2)
    n_pairs = len(texts["train"])
    curve, best = [], None
    for epoch in range(epochs):
        probe.train()
        order = torch.randperm(n_pairs)
        for start in range(0, n_pairs - batch + 1, batch):
            pairs = order[start : start + batch]
            image_ids = pairs // 5
            x = images["train"][image_ids]
            if mirror_train:
                x = torch.where((torch.rand(len(pairs)) < 0.5)[:, None], mirrored["train"][image_ids], x)
            sims = F.normalize(probe(drop(x)), dim=-1) @ F.normalize(
                drop(texts["train"][pairs]), dim=-1).T
            loss = hinge_triplet_loss(sims, image_ids, 0.2, hardest=epoch > 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        probe.eval()
        with torch.no_grad():
            dev = retrieval_metrics((embed("dev") @ texts["dev"].T).numpy())
            curve.append(round(dev["rsum"], 2))
            if best is None or dev["rsum"] > best[0]:
                test = retrieval_metrics((embed("test") @ texts["test"].T).numpy())
                best = (dev["rsum"], epoch + 1, test, {k: v.clone() for k, v in probe.state_dict().items()})
    out = {"seed": seed, "dev_rsum_per_epoch": curve, "best_epoch": best[1],
           "test": {k: round(best[2][k], 2) for k in KEYS}}
    if querybank:
        probe.load_state_dict(best[3])
        with torch.no_grad():
            out["querybank"] = _score_with_querybank(embed, texts)
    return out


def _score_with_querybank(embed, texts: dict) -> dict:
    """The probe's test metrics on query-bank-normalised scores (:mod:`selfalign.evaluate.querybank`)."""
    bank_texts = texts["train"][torch.from_numpy(sample_rows(len(texts["train"]), 10_000, 1))]
    train_images = embed("train")
    bank_images = train_images[torch.from_numpy(sample_rows(len(train_images), 5_000, 0))]
    beta_images, beta_captions, table = choose_betas(embed("dev"), texts["dev"], bank_texts, bank_images)
    test_images = embed("test")
    bank = QueryBank(bank_texts, bank_images, beta_images, beta_captions)
    i2t, t2i = bank.normalise(test_images @ texts["test"].T, test_images, texts["test"])
    test = retrieval_metrics(i2t.numpy(), t2i_sims=t2i.numpy())
    return {"beta_images": beta_images, "beta_captions": beta_captions, "dev": table,
            "test": {k: round(test[k], 2) for k in KEYS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, required=True, help="grid feature store (region 0 = whole image)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mirror", default="", choices=["", "train", "test", "train,test"],
                        help="use the store's mirrored copies (extract --mirror): flip augmentation in training, "
                             "the mean of both views in scoring, or both")
    parser.add_argument("--querybank", action="store_true",
                        help="also score each probe with a query bank of training queries (beta chosen on dev)")
    parser.add_argument("--json", type=Path, help="write the results here (atomically)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    encoder = MiniLMTextEncoder(dim=8, trainable_layers=0).eval()
    images, texts, mirrored = {}, {}, {}
    for split in ("train", "dev", "test"):
        store = load_feature_split(args.features, split)
        images[split] = torch.from_numpy(np.asarray(store.images[:, 0], dtype=np.float32))
        texts[split] = sentence_vectors(encoder, list(store.captions))
        if args.mirror:
            copy = load_mirror_split(args.features, split, store)
            mirrored[split] = torch.from_numpy(np.asarray(copy.images[:, 0], dtype=np.float32))
    encode_s = time.perf_counter() - started
    modes = args.mirror.split(",")
    runs = [train_probe(images, texts, args.epochs, int(s), args.lr, args.batch_size, mirrored, "train" in modes,
                        "test" in modes, args.querybank) for s in args.seeds.split(",")]

    def mean_std(tests: list[dict]) -> dict:
        return {k: {"mean": round(statistics.fmean(t[k] for t in tests), 2),
                    "std": round(statistics.stdev(t[k] for t in tests), 2) if len(tests) > 1 else 0.0}
                for k in KEYS}

    summary = mean_std([r["test"] for r in runs])
    result = {"features": str(args.features), "mirror": args.mirror, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
              "threads": args.threads, "encode_seconds": round(encode_s, 1),
              "seconds": round(time.perf_counter() - started, 1), "runs": runs, "test_mean_std": summary}
    if args.querybank:
        result["querybank_test_mean_std"] = mean_std([r["querybank"]["test"] for r in runs])
    print(json.dumps(result, indent=1))
    if args.json:
        atomic.write_json(args.json, result)


if __name__ == "__main__":
    main()
