"""TileOutlier, default pooled embedding with overlapping, position-aware tiles, at 128 px."""

from anomalib_ext.models import TileOutlier
from tests.harness.case import ModelCase


def _build() -> TileOutlier:
    return TileOutlier(image_size=128, tiling={"tile_size": 16, "stride": 8}, memory_bank={"max_tiles": 20_000})


CASE = ModelCase(name="tile_outlier", build=_build, image_size=128, max_epochs=1)
