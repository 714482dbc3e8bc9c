"""The Flickr30K / MS-COCO reference configs run as shipped on tiny files in the SCAN precomputed layout."""

from pathlib import Path

import numpy as np
import pytest

from selfalign.config import load_config
from selfalign.pipeline import evaluate_run
from selfalign.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "selfalign" / "configs"


def write_scan_layout(root: Path, splits: dict[str, int], regions: int = 36, dim: int = 2048) -> Path:
    """SCAN's release: float32 ``{split}_ims.npy`` [N, 36, 2048] and ``{split}_caps.txt``; no ids, no masks."""
    rng = np.random.default_rng(0)
    words = "a man woman dog cat runs sits on the grass red blue ball street".split()
    root.mkdir(parents=True, exist_ok=True)
    for split, n in splits.items():
        np.save(root / f"{split}_ims.npy", rng.normal(size=(n, regions, dim)).astype(np.float32))
        caps = [" ".join(rng.choice(words, size=rng.integers(4, 10))) for _ in range(5 * n)]
        (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    return root


@pytest.mark.parametrize("config,test_split,fold5", [("f30k_precomp.yaml", "test", False),
                                                     ("coco_precomp.yaml", "testall", True)])
def test_reference_config_runs_a_few_steps(tmp_path, config, test_split, fold5):
    feats = write_scan_layout(tmp_path / "precomp", {"train": 16, "dev": 5, test_split: 10})
    cfg = load_config(CONFIGS / config, [f"data.features={feats}", f"out_dir={tmp_path / 'runs'}", "train.epochs=1",
                                         "train.batch_size=8", "train.max_steps_per_epoch=2", "train.device=cpu",
                                         "train.num_workers=0"])
    assert cfg.model.image_dim == 2048 and cfg.align.codebook_size == 1024 and cfg.align.sinkhorn_iters == 2
    run = train(cfg, progress=False)
    metrics = evaluate_run(run, test_split, fold5=fold5, device="cpu")
    assert metrics["n_images"] == (2 if fold5 else 10)
    assert 0 <= metrics["rsum"] <= 600
