"""Fused (the recommended default): tile outliers + global density on one backbone pass, at 128 px."""

from anomalib_ext.models import Fused
from tests.harness.case import ModelCase


def _build() -> Fused:
    return Fused(image_size=128, tile_size=16, stride=8, max_bank_tiles=20_000)


CASE = ModelCase(name="fused", build=_build, image_size=128, max_epochs=1)
