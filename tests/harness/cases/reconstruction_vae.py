"""Reconstruction, VAE (scored by its mean reconstruction): small network at 64 px on synthetic bottles."""

from anomalib_ext.models import Reconstruction
from tests.harness.case import ModelCase


def _build() -> Reconstruction:
    return Reconstruction(
        variant="vae",
        image_size=64,
        latent_dim=32,
        base_channels=16,
        num_downsamples=3,
        learning_rate=3e-3,
        # as configs/reconstruction/vae.yaml: a KL weight of 1e-3 blurs reconstructions towards the mean part
        loss_weights={"kl": 1e-4},
        map_sigma=1.0,
    )


CASE = ModelCase(name="reconstruction_vae", build=_build, image_size=64, max_epochs=16)
