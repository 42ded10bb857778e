"""Dfkdm with pooled backbone features and its default density (probabilistic PCA): fit-only, image-level."""

from anomalib_ext.models import Dfkdm
from tests.harness.case import ModelCase


def _build() -> Dfkdm:
    return Dfkdm(image_size=128)  # density gaussian, n_components 0.97, residual


CASE = ModelCase(name="dfkdm_backbone", build=_build, image_size=128, max_epochs=1)
