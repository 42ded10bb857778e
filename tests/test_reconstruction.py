"""Reconstruction family and the shared autoencoder: numerics, determinism, configuration errors."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch
from torchvision.transforms.v2 import InterpolationMode, Normalize, Resize

from anomalib_ext.models import Reconstruction
from anomalib_ext.models.components import ConvAutoencoder, MapMoments, ReconstructionLoss
from anomalib_ext.models.reconstruction import ReconstructionModel

SMALL = {"image_size": 32, "latent_dim": 8, "base_channels": 8, "num_downsamples": 2}
LOSS = {"l2_weight": 1.0, "ssim_weight": 1.0, "ssim_window_size": 11, "ssim_sigma": 1.5}


def _torch_model(**kwargs) -> ReconstructionModel:
    """The torch model with ``Reconstruction``'s defaults (declared there only)."""
    return Reconstruction(**kwargs, visualizer=False).model


@pytest.mark.parametrize("variant", ["ae", "vae"])
@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_constant_images_give_finite_loss_gradients_and_maps(variant: str, value: float) -> None:
    torch.manual_seed(0)
    model = _torch_model(variant=variant, **SMALL)
    loss = ReconstructionLoss(beta=1.0, **LOSS)
    images = torch.full((4, 3, 32, 32), value)
    terms = loss(images, model(images))
    terms["loss"].backward()
    assert all(torch.isfinite(term).all() for term in terms.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # zero spread everywhere: the floor must keep the standardised map finite
    moments = MapMoments()
    moments.add(torch.zeros(3, 1, 32, 32))
    model.fit_map_statistics(moments)
    model.eval()
    with torch.no_grad():
        output = model(images)
    assert isinstance(output, InferenceBatch)
    assert torch.isfinite(output.anomaly_map).all()
    assert torch.isfinite(output.pred_score).all()


def test_autoencoder_output_range_shapes_and_vae_determinism() -> None:
    torch.manual_seed(0)
    network = ConvAutoencoder(in_channels=3, image_size=(32, 64), latent_dim=6, base_channels=8, variational=True)
    images = torch.rand(2, 3, 32, 64)
    output = network(images)
    assert output.reconstruction.shape == images.shape
    assert output.latent.shape == (2, 6)
    assert output.reconstruction.min() >= 0
    assert output.reconstruction.max() <= 1
    # training samples the code; inference decodes the mean, so two passes agree exactly
    assert not torch.equal(network(images).reconstruction, output.reconstruction)
    network.eval()
    first, second = network(images), network(images)
    assert torch.equal(first.reconstruction, second.reconstruction)
    assert torch.equal(first.latent, first.mu)


def test_plain_autoencoder_has_no_variational_terms() -> None:
    network = ConvAutoencoder(in_channels=1, image_size=32, latent_dim=4, base_channels=8)
    output = network(torch.rand(1, 1, 32, 32))
    assert output.mu is None
    assert output.logvar is None
    assert "kl" not in ReconstructionLoss(beta=1e-3, **LOSS)(torch.rand(1, 1, 32, 32), output)


def test_map_statistics_are_learned_from_training_batches_and_standardise_normal_maps() -> None:
    torch.manual_seed(0)
    model = Reconstruction(variant="ae", **SMALL, map_sigma=1.0)
    images = torch.rand(6, 3, 32, 32) * 0.2 + 0.4
    batch = ImageBatch(image=images)
    model.on_train_epoch_start()
    model.training_step(batch)
    model.on_validation_epoch_start()  # commits the epoch's statistics
    stats = model.model.map_stats
    assert not torch.equal(stats.mean, torch.zeros_like(stats.mean))
    assert (stats.scale > 0).all()
    model.eval()
    with torch.no_grad():
        normal_map = model.model(images).anomaly_map
    # the same images standardised by their own statistics: mean ~0 at every pixel
    assert normal_map.mean(dim=0).abs().max() < 1e-3


def test_default_pre_processor_resizes_nearest_without_normalising() -> None:
    model = Reconstruction(image_size=64, base_channels=8, latent_dim=8)
    transforms = list(model.pre_processor.transform.transforms)
    assert not any(isinstance(t, Normalize) for t in transforms)
    resizes = [t for t in transforms if isinstance(t, Resize)]
    assert len(resizes) == 1
    assert resizes[0].interpolation == InterpolationMode.NEAREST
    assert list(resizes[0].size) == [64, 64]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "gan"}, "variant"),
        ({"image_size": 100}, "divisible"),
        ({"anomaly_map_mode": "cosine"}, "anomaly_map_mode"),
        ({"topk_fraction": 0.0}, "topk_fraction"),
        ({"l2_weight": 0.0, "ssim_weight": 0.0}, "l2_weight"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"base_channels": 2}, "base_channels"),
    ],
)
def test_bad_configuration_is_reported_by_parameter_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Reconstruction(**kwargs)


def test_images_of_the_wrong_size_get_a_clear_error() -> None:
    model = Reconstruction(**SMALL)
    with pytest.raises(ValueError, match="image_size"):
        model.training_step(ImageBatch(image=torch.rand(2, 3, 64, 64)))


def test_l2_map_and_raw_map_options() -> None:
    torch.manual_seed(0)
    model = _torch_model(**SMALL, anomaly_map_mode="l2", normalize_map=False, map_sigma=0).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        output = model(images)
        reconstruction = model.autoencoder(images).reconstruction
    expected = ((images - reconstruction) ** 2).mean(dim=1, keepdim=True)
    torch.testing.assert_close(output.anomaly_map, expected)
