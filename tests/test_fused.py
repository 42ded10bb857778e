"""Fused, the recommended default: what its two halves and their fusion promise (the shared model harness covers
training, planted defects, thresholds, export parity and reloading: tests/harness/cases/fused.py)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.models import Fused
from anomalib_ext.models.fused.torch_model import FusedModel

IMAGE_SIZE = 64


def _model(fusion: str = "mean") -> FusedModel:
    return Fused(image_size=IMAGE_SIZE, tile_size=16, stride=16, max_bank_tiles=64, fusion=fusion).model


def _normal_data(model: FusedModel, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile embeddings near one unit direction per grid position and global features around a fixed mean."""
    rows, cols = model.tiles.grid.shape
    tile_dim = 24 + 40 + 112  # tf_efficientnet_lite0 blocks.1 + blocks.2 + blocks.4
    centre = F.normalize(torch.randn(rows, cols, tile_dim, generator=generator), dim=-1)
    tiles = F.normalize(centre + 0.05 * torch.randn(count, rows, cols, tile_dim, generator=generator), dim=-1)
    features = 3.0 + torch.randn(count, 472, generator=generator)
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


def test_too_few_images_to_calibrate_is_one_clear_error() -> None:
    model = _model()
    tiles, features = _normal_data(model, 2, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="at least 3 training images"):
        model.fit(tiles, features)


def test_unknown_fusion_is_refused() -> None:
    with pytest.raises(ValueError, match="fusion must be one of"):
        Fused(image_size=IMAGE_SIZE, fusion="sum")  # type: ignore[arg-type]
