"""Fused, the recommended default: what its two halves and their fusion promise (the shared model harness covers
training, planted defects, thresholds, export parity and reloading: tests/harness/cases/fused.py)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.models import Fused
from anomalib_ext.models.fused.torch_model import FusedModel, pooled_mean_and_spread

IMAGE_SIZE = 64


def _model(fusion: str = "mean") -> FusedModel:
    return Fused(image_size=IMAGE_SIZE, tile_size=16, stride=16, max_bank_tiles=64, fusion=fusion).model


def _normal_data(model: FusedModel, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile embeddings near one unit direction per grid position and global features around a fixed mean."""
    rows, cols = model.tiles.grid.shape
    tile_dim = 24 + 40 + 112  # tf_efficientnet_lite0 blocks.1 + blocks.2 + blocks.4
    centre = F.normalize(torch.randn(rows, cols, tile_dim, generator=generator), dim=-1)
    tiles = F.normalize(centre + 0.05 * torch.randn(count, rows, cols, tile_dim, generator=generator), dim=-1)
    features = 3.0 + torch.randn(count, 2 * (40 + 112), generator=generator)  # mean and spread, blocks.2 + blocks.4
    return tiles, features


def _score(model: FusedModel, tiles: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return model.fuse(model.tiles.tile_scores(tiles).amax((1, 2)), model.density(features))


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_a_defect_either_half_sees_alone_outscores_every_normal_image(fusion: str) -> None:
    """The two raw scores live on unrelated scales (a cosine distance of ~0.01, a log likelihood of hundreds): only
    standardising each on held-out normal scores lets a defect seen by one half alone stand out. A raw sum fails
    the tile-only case (measured: the local defect's fused score falls below the normal images')."""
    generator = torch.Generator().manual_seed(0)
    model = _model(fusion)
    tiles, features = _normal_data(model, 60, generator)
    model.fit(tiles[:40], features[:40])
    normal = _score(model, tiles[40:], features[40:])
    local_defect, global_defect = tiles[40:41].clone(), features[41:42].clone()
    local_defect[0, 1, 2] = F.normalize(torch.randn(local_defect.shape[-1], generator=generator), dim=0)  # one tile
    global_defect += 0.8 * torch.randn(global_defect.shape, generator=generator)  # every pooled feature moves a bit
    local_score = _score(model, local_defect, features[40:41])
    global_score = _score(model, tiles[41:42], global_defect)
    assert float(local_score) > float(normal.max())
    assert float(global_score) > float(normal.max())
    # and a typical new normal image scores near 0 on the standardised scale, not far above it
    assert abs(float(normal.median())) < 2.0


def test_one_backbone_pass_per_image() -> None:
    """Both halves read the same pass: the exported graph holds one trunk, not two."""
    model = _model()
    generator = torch.Generator().manual_seed(1)
    tiles, features = _normal_data(model, 6, generator)
    model.fit(tiles, features)
    model.eval()
    calls = []
    model.feature_extractor.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        output = model(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert len(calls) == 1
    assert output.pred_score.shape == (2,)
    assert output.anomaly_map.shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE)


def test_the_default_pass_ends_where_tile_outliers_does() -> None:
    """The cost promise (at most 1.3x TileOutlier's OpenVINO time): the global half reads no deeper layer than the
    tile half, so the backbone stops at blocks.4 as TileOutlier's does."""
    model = _model()
    assert model.feature_extractor.layers == ["blocks.1", "blocks.2", "blocks.4"]
    assert model.spread_windows == [2, 1]  # a 16 px tile covers 2 x 2 cells of blocks.2 (stride 8), 1 of blocks.4
    with torch.no_grad():
        features = model.feature_extractor(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert list(features) == ["blocks.1", "blocks.2", "blocks.4"]


def test_the_global_features_see_a_change_of_contrast_that_keeps_the_mean() -> None:
    """A busier grain with the same average activation (a texture defect) moves the spread half of the vector; with a
    window, the spread is that of the window means (pixel noise that averages out inside a tile does not count)."""
    generator = torch.Generator().manual_seed(3)
    calm = 1.0 + 0.1 * torch.randn(1, 8, 16, 16, generator=generator)
    mean = calm.mean((2, 3), keepdim=True)
    busy = mean + 3.0 * (calm - mean)  # the same mean, three times the spread
    calm_vector, busy_vector = pooled_mean_and_spread(calm, 1), pooled_mean_and_spread(busy, 1)
    assert torch.allclose(calm_vector[:, :8], busy_vector[:, :8], atol=1e-5)
    assert torch.allclose(busy_vector[:, 8:], 3.0 * calm_vector[:, 8:], rtol=1e-4)
    assert torch.allclose(calm_vector[:, 8:], calm.std((2, 3), unbiased=False), rtol=1e-4)
    noise = 0.5 * torch.randn(1, 8, 16, 16, generator=generator)  # one value per cell: averages out over 4 x 4
    stripes = torch.zeros(1, 8, 16, 16)
    stripes[..., :8, :] = 0.5  # half the surface brighter: a change at the scale of the window
    windowed_noise, windowed_stripes = pooled_mean_and_spread(noise, 4), pooled_mean_and_spread(stripes, 4)
    assert float(windowed_noise[:, 8:].max()) < 0.5 * float(pooled_mean_and_spread(noise, 1)[:, 8:].min())
    assert float(windowed_stripes[:, 8:].min()) > 0.8 * float(pooled_mean_and_spread(stripes, 1)[:, 8:].max())


def test_too_few_images_to_calibrate_is_one_clear_error() -> None:
    model = _model()
    tiles, features = _normal_data(model, 2, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="at least 3 training images"):
        model.fit(tiles, features)


def test_unknown_fusion_is_refused() -> None:
    with pytest.raises(ValueError, match="fusion must be one of"):
        Fused(image_size=IMAGE_SIZE, fusion="sum")  # type: ignore[arg-type]


def test_extend_bank_adds_new_normals_to_the_tile_half_and_scores_each_against_the_others_only() -> None:
    """``anomalib-ext recalibrate --extend-bank`` on Fused: the new condition's images join the tile bank; the scores
    it returns for the thresholds are leave-one-out ones (image i against the bank extended by the others), and the
    density half stays as fitted."""
    generator = torch.Generator().manual_seed(3)
    fused = Fused(image_size=IMAGE_SIZE, tile_size=16, stride=16, max_bank_tiles=64)
    model = fused.model.eval()
    part = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    normals = (part + 0.05 * torch.rand(12, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)).clamp(0, 1)
    with torch.no_grad():
        model.fit(*model.extract(normals))
    shaded = normals[:6] * torch.linspace(1.0, 0.3, IMAGE_SIZE)  # a light falling off across the part
    fitted_bank = model.tiles.memory_bank.clone()
    density = {name: value.clone() for name, value in model.density.state_dict().items()}

    held_out = fused.extend_bank(shaded)

    assert model.tiles.memory_bank.shape[2] == fitted_bank.shape[2] + 6
    assert all(torch.equal(value, model.density.state_dict()[name]) for name, value in density.items())
    with torch.no_grad():
        in_bank = model(shaded).pred_score
        assert bool((held_out.pred_score > in_bank).all()), (held_out.pred_score, in_bank)
        model.tiles.memory_bank = fitted_bank
        model.tiles.extend(model.extract(shaded[1:])[0])
        assert torch.allclose(model(shaded[:1]).pred_score, held_out.pred_score[:1])
