"""Dfkdm with pooled backbone features and a leave-one-out KDE: fit-only, image-level."""

from anomalib_ext.models import Dfkdm
from tests.harness.case import ModelCase


def _build() -> Dfkdm:
    return Dfkdm(feature_source="backbone", image_size=128, n_components=8, bandwidth="loo")


CASE = ModelCase(name="dfkdm_backbone", build=_build, image_size=128, max_epochs=1)
