"""Reconstruction, plain autoencoder: a small network at 64 px, a few epochs on synthetic bottles."""

from anomalib_ext.models import Reconstruction
from tests.harness.case import ModelCase


def _build() -> Reconstruction:
    return Reconstruction(
        variant="ae",
        image_size=64,
        latent_dim=32,
        base_channels=16,
        num_downsamples=3,
        learning_rate=3e-3,
        map_sigma=1.0,
    )


CASE = ModelCase(name="reconstruction_ae", build=_build, image_size=64, max_epochs=16)
