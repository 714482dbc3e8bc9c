"""The image encoder: padding never changes an image's outputs; the optional mean-region skip path."""

from __future__ import annotations

import pytest
import torch

from selfalign.config import load_config
from selfalign.errors import ConfigError, InputError
from selfalign.model.checkpoint import build_model
from selfalign.model.image_encoder import ImageEncoder


@pytest.mark.parametrize("mean_skip", [False, True])
def test_padding_never_changes_the_outputs(mean_skip):
    torch.manual_seed(0)
    encoder = ImageEncoder(12, 8, context_layers=1, heads=2, dropout=0.0, mean_skip=mean_skip).eval()
    regions = torch.randn(3, 4, 12)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    padded = torch.cat([regions, 50 * torch.randn(3, 3, 12)], dim=1)  # garbage in every padded slot
    padded[:, :4][~mask] = 50 * torch.randn(int((~mask).sum()), 12)
    wide_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1)
    pooled, free, context = encoder(padded, wide_mask)
    for b in range(3):
        n = int(mask[b].sum())
        alone = encoder(regions[b : b + 1, :n], mask[b : b + 1, :n])
        torch.testing.assert_close(pooled[b], alone[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(context[b, :n], alone[2][0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(pooled).all()


def test_mean_skip_adds_a_trained_linear_path_to_the_pooled_vector():
    torch.manual_seed(1)
    encoder = ImageEncoder(12, 8, context_layers=0, dropout=0.0, mean_skip=True)
    regions, mask = torch.randn(5, 4, 12), torch.ones(5, 4, dtype=torch.bool)
    pooled, _, _ = encoder(regions, mask)
    pooled.sum().backward()
    assert encoder.mean_skip.weight.grad is not None and encoder.mean_skip.weight.grad.abs().sum() > 0
    with torch.no_grad():
        encoder.mean_skip.weight.zero_()
        encoder.mean_skip.bias.zero_()
        without = ImageEncoder(12, 8, context_layers=0, dropout=0.0)
        without.load_state_dict({k: v for k, v in encoder.state_dict().items() if not k.startswith("mean_skip")})
        torch.testing.assert_close(encoder(regions, mask)[0], without(regions, mask)[0])


def test_config_switch_builds_and_reloads_strictly(tmp_path):
    cfg = load_config(None, ["model.image_mean_skip=true", "model.text_encoder=bigru", "model.embed_dim=16",
                             "model.image_dim=12", "model.word_dim=8", "model.image_context_heads=2",
                             "align.codebook_size=8"])
    from selfalign.data.text import Vocabulary

    vocab = Vocabulary.build(["a red cube", "a blue ball"])
    model = build_model(cfg, vocab)
    assert model.image_encoder.mean_skip is not None
    fresh = build_model(cfg, vocab)
    fresh.load_state_dict(model.state_dict(), strict=True)
    plain = build_model(load_config(None, ["model.text_encoder=bigru", "model.embed_dim=16", "model.image_dim=12",
                                           "model.word_dim=8", "model.image_context_heads=2",
                                           "align.codebook_size=8"]), vocab)
    assert plain.image_encoder.mean_skip is None
    with pytest.raises(RuntimeError):
        plain.load_state_dict(model.state_dict(), strict=True)


def _tail_config(*extra: str):
    return load_config(None, ["model.image_backbone_tail=true", "model.image_dim=192", "model.text_encoder=bigru",
                              "model.embed_dim=16", "model.word_dim=8", "model.image_context_heads=2",
                              "align.codebook_size=8", *extra])


def test_backbone_tail_turns_stored_cells_into_grid_regions(tmp_path):
    """model.image_backbone_tail: the model runs the backbone's top on a tail store's cells and encodes the result
    exactly as a grid store's regions (whole image first); a dropped cell only hides its own final region."""
    from selfalign.data.text import Vocabulary
    from selfalign.model.checkpoint import WEIGHTS, load_model, save_run_files, save_weights
    from selfalign.train.trainer import build_optimizer

    vocab = Vocabulary.build(["a red cube", "a blue ball"])
    cfg = _tail_config()
    torch.manual_seed(0)
    model = build_model(cfg, vocab).eval()
    cells = torch.randn(2, 9, 192)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 4] = False
    with torch.no_grad():
        final = model.image_tail(cells.transpose(1, 2).unflatten(2, (3, 3))).flatten(2).transpose(1, 2)
        grid = torch.cat([final.mean(1, keepdim=True), final], dim=1)
        expected = model.image_encoder(grid, torch.cat([torch.ones(2, 1, dtype=torch.bool), mask], 1))[0]
        got = model.encode_image(cells, mask)
    torch.testing.assert_close(got.base, expected)
    assert got.mask.shape == (2, 10) and not got.mask[1, 5] and got.mask[:, 0].all()
    groups = build_optimizer(model, cfg).param_groups
    tail_ids = {id(p) for p in model.image_tail.parameters()}
    tail_group = [g for g in groups if {id(p) for p in g["params"]} == tail_ids]
    assert len(tail_group) == 1 and tail_group[0]["lr"] == pytest.approx(cfg.train.lr * cfg.model.backbone_lr_scale)
    run = tmp_path / "run"
    run.mkdir()
    save_run_files(run, cfg, vocab)
    save_weights(model, run / WEIGHTS)
    reloaded, _ = load_model(run)  # built with random weights, filled from the checkpoint
    torch.testing.assert_close(reloaded.encode_image(cells, mask).embedding, got.embedding)
    with torch.no_grad():
        model.image_tail.conv_head.weight.add_(1.0)
    assert not torch.equal(reloaded.image_tail.conv_head.weight, model.image_tail.conv_head.weight)
    torch.testing.assert_close(reloaded.image_tail.conv_head.weight + 1.0, model.image_tail.conv_head.weight)
    with pytest.raises(InputError, match="G x G cells"):
        model.encode_image(torch.randn(1, 8, 192), torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(ConfigError, match="model.image_dim.*192"):
        build_model(_tail_config("model.image_dim=1280"), vocab)
