"""Reconstruction family and the shared autoencoder: numerics, determinism, configuration errors."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch
from torchvision.transforms.v2 import InterpolationMode, Normalize, Resize

from anomalib_ext.models import Reconstruction
from anomalib_ext.models.components import AutoencoderOutput, ConvAutoencoder, MapMoments, ReconstructionLoss
from anomalib_ext.models.reconstruction import LossWeights, ReconstructionModel

SMALL = {"image_size": 32, "latent_dim": 8, "base_channels": 8, "num_downsamples": 2}
LOSS = {"l2_weight": 1.0, "ssim_weight": 1.0}


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
    assert model.fit(moments)
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
    # ... and a spread of order 1 (the per-pixel spread plus its image mean divides it: below 1, far above 0)
    spread = normal_map.std(dim=0, unbiased=False).mean()
    assert 0.2 < spread < 1.0, spread


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
        ({"topk_fraction": 0.0}, r"topk_fraction must be in \(0, 1\]"),
        ({"topk_fraction": 1.5}, "topk_fraction"),
        ({"map_sigma": -1.0}, "map_sigma"),
        ({"loss_weights": {"l2": 0.0, "ssim": 0.0}}, "l2_weight and ssim_weight cannot both be 0"),
        ({"loss_weights": {"kl": -1.0}}, "beta must be >= 0"),
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


class _PatchedReconstruction(torch.nn.Module):
    """Stands in for the autoencoder: reconstructs every pixel exactly except an 8x8 patch, off by ``errors[i]`` in
    image ``i`` (different per image, so maps or scores swapped between images are caught)."""

    def __init__(self, errors: tuple[float, ...]) -> None:
        super().__init__()
        self.errors = torch.tensor(errors).view(-1, 1, 1, 1)

    def forward(self, images: torch.Tensor) -> AutoencoderOutput:
        reconstruction = images.clone()
        reconstruction[:, :, 12:20, 12:20] += self.errors
        return AutoencoderOutput(reconstruction=reconstruction, latent=images.flatten(1), mu=None, logvar=None)


@pytest.mark.parametrize("mode", ["l2", "ssim"])
def test_map_lights_up_exactly_where_the_reconstruction_is_wrong(mode: str) -> None:
    model = _torch_model(**SMALL, anomaly_map_mode=mode, map_sigma=0).eval()
    model.autoencoder = _PatchedReconstruction(errors=(0.3, 0.15))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5
    with torch.no_grad():
        output = model(images)
    anomaly_map = output.anomaly_map[:, 0]
    inside = anomaly_map[:, 12:20, 12:20]
    outside = anomaly_map.clone()
    outside[:, 7:25, 7:25] = 0  # the SSIM window (11 taps) reaches 5 pixels beyond the patch
    if mode == "l2":  # every channel off by 0.3 (0.15): squared residual 0.09 (0.0225) on the patch, 0 elsewhere
        torch.testing.assert_close(inside, torch.tensor([0.09, 0.0225]).view(2, 1, 1).expand_as(inside))
        assert anomaly_map.sum() == pytest.approx(64 * (0.09 + 0.0225), rel=1e-4)
    else:  # identical neighbourhoods have SSIM 1; the larger error is the worse reconstruction
        assert inside.min() > 0.01
        assert output.pred_score[0] > output.pred_score[1] * 1.2
    assert outside.abs().max() < 1e-4
    # the score is the mean of the top 1% of the 1024 pixels (10 of them), all on the patch
    torch.testing.assert_close(output.pred_score, inside.flatten(1).topk(10, dim=1).values.mean(dim=1))


def test_fit_needs_two_maps_and_then_starts_a_new_accumulation() -> None:
    torch.manual_seed(0)
    model = _torch_model(**SMALL)
    images = torch.rand(1, 3, 32, 32)
    model.accumulate(images, model.autoencoder(images))
    assert not model.fit()  # one map has no spread: nothing learned
    assert torch.equal(model.map_stats.mean, torch.zeros_like(model.map_stats.mean))
    model.accumulate(images.flip(-1), model.autoencoder(images.flip(-1)))
    assert model.map_moments.total == 2
    assert model.fit()
    assert model.map_moments.total == 0
    assert model.map_stats.mean.abs().max() > 0


def test_loss_weights_accept_a_partial_mapping_and_reject_unknown_keys() -> None:
    model = Reconstruction(variant="vae", **SMALL, loss_weights={"kl": 1e-3})
    assert (model.loss.l2_weight, model.loss.ssim_weight, model.loss.beta) == (1.0, 1.0, 1e-3)
    assert LossWeights.coerce(None) == LossWeights(l2=1.0, ssim=1.0, kl=1e-4)
    with pytest.raises(ValueError, match="unknown keys"):
        Reconstruction(**SMALL, loss_weights={"beta": 1e-3})
