"""Dfkdm and DfkdmLake beyond the shared harness: degenerate images, LAKE features, the nested density settings,
clear errors, calibrated scores."""

from __future__ import annotations

import pytest
import torch

from anomalib_ext.models import Dfkdm, DfkdmLake
from anomalib_ext.models.dfkdm.torch_model import DensitySettings, LakeModel, reconstruction_error_features


def _tiny_lake(**kwargs) -> LakeModel:
    defaults = {"image_size": 32, "latent_dim": 4, "base_channels": 8, "num_downsamples": 2}
    return DfkdmLake(**{**defaults, **kwargs}, visualizer=False).model


def test_reconstruction_features_of_constant_images_are_finite() -> None:
    black = torch.zeros(2, 3, 16, 16)
    grey = torch.full((2, 3, 16, 16), 0.5)
    for images, reconstruction in ((black, black), (black, grey), (grey, grey), (grey, black)):
        residual = (images - reconstruction).pow(2).mean(1, keepdim=True)
        features = reconstruction_error_features(images, reconstruction, residual)
        assert features.shape == (2, 3)
        assert torch.isfinite(features).all(), features


def test_centred_cosine_separates_what_raw_cosine_cannot() -> None:
    # two different patterns on a bright background: raw cosine ~1, centred cosine clearly lower
    base = torch.full((1, 1, 16, 16), 0.8)
    first, second = base.clone(), base.clone()
    first[..., :8, :] += 0.1
    second[..., :, :8] += 0.1
    raw = torch.nn.functional.cosine_similarity(first.flatten(1), second.flatten(1))
    features = reconstruction_error_features(first, second, (first - second).pow(2))
    assert float(raw) > 0.99
    assert float(features[0, 1]) < 0.1


@pytest.mark.parametrize("kind", ["kde", "gaussian"])
def test_lake_on_constant_images_gives_no_nan(kind: str) -> None:
    torch.manual_seed(0)
    model = _tiny_lake(density={"kind": kind, "n_components": 0}).eval()
    constant = torch.full((12, 3, 32, 32), 0.5)
    model.fit(model.extract_features(constant))
    with torch.no_grad():
        normal = model(constant[:2])
        other = model(torch.zeros(2, 3, 32, 32))
    for output in (normal, other):
        assert torch.isfinite(output.pred_score).all()
        assert torch.isfinite(output.anomaly_map).all()
        assert output.anomaly_map.shape == (2, 1, 32, 32)
    assert (other.pred_score > normal.pred_score).all()


def test_backbone_model_fit_scores_far_images_above_the_normal_ones() -> None:
    """``DfkdmModel.fit(features)`` alone (no Lightning) makes a working detector: noise images, far from the
    flat normal images in feature space, score above every held-out normal image."""
    torch.manual_seed(0)
    model = Dfkdm(image_size=64, layers=["blocks.2"], density={"n_components": 4}, visualizer=False).model
    normal = torch.rand(24, 3, 1, 1) * 0.2 + 0.4 + torch.randn(24, 3, 64, 64) * 0.01  # flat colours, a little noise
    model.train()
    with torch.no_grad():
        assert model.fit(model(normal[:20])) == 20
        model.eval()
        held_out = model(normal[20:]).pred_score
        noise = model(torch.rand(4, 3, 64, 64)).pred_score
    assert float(noise.min()) > float(held_out.max())


def test_calibrated_scores_lie_in_unit_interval_and_keep_the_ranking() -> None:
    torch.manual_seed(0)
    raw_model = _tiny_lake().eval()
    calibrated_model = _tiny_lake(calibrate=True).eval()
    calibrated_model.load_state_dict(raw_model.state_dict())
    images = torch.rand(16, 3, 32, 32) * 0.1 + 0.4
    queries = torch.cat([images[:4], torch.rand(4, 3, 32, 32)])
    raw_model.fit(raw_model.extract_features(images))
    calibrated_model.load_state_dict(raw_model.state_dict())
    with torch.no_grad():
        raw = raw_model(queries).pred_score
        calibrated = calibrated_model(queries).pred_score
    assert float(calibrated.min()) >= 0.0
    assert float(calibrated.max()) <= 1.0
    in_raw_order = calibrated[torch.argsort(raw)]
    assert (in_raw_order[1:] >= in_raw_order[:-1]).all()  # monotone (the logistic may saturate to ties)
    assert float(calibrated[4:].min()) > float(calibrated[:4].max())


def test_density_settings_from_a_mapping_keep_the_class_defaults_for_the_fields_left_out() -> None:
    lake = _tiny_lake(density={"max_training_points": 7})
    assert lake.density.max_training_points == 7
    assert type(lake.density.estimator).__name__ == "GaussianKde"  # DfkdmLake's default kind, not DensitySettings'
    assert lake.density.pca.n_components == 0
    assert DensitySettings.coerce({"kind": "kde"}) == DensitySettings(kind="kde")
    explicit = DensitySettings(kind="gaussian", n_components=3)
    assert _tiny_lake(density=explicit).density.pca.n_components == 3  # a full DensitySettings is taken as it is
    backbone = Dfkdm(image_size=64, layers=["blocks.2"], density=DensitySettings(kind="kde", residual=False))
    assert type(backbone.model.density.estimator).__name__ == "GaussianKde"
    assert not backbone.model.density.residual


def test_nested_density_parses_from_the_command_line_over_the_class_default() -> None:
    """What ``anomalib train --model DfkdmLake --model.density.kind gaussian`` gives: the one field changed, the
    others from DfkdmLake's own default (no PCA), not from ``DensitySettings``'s (97 % of the variance)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DfkdmLake, "model")
    config = parser.parse_args(["--model.density.kind", "gaussian", "--model.density.max_training_points", "50"])
    density = config.model.density
    density = getattr(
        density, "init_args", density
    )  # jsonargparse keeps a non-final dataclass as class_path + init_args
    assert (density.kind, density.max_training_points, density.n_components, density.residual) == (
        "gaussian",
        50,
        0,
        False,
    )
    with pytest.raises(Exception, match="kind"):
        parser.parse_args(["--model.density.kind", "gmm"])


def test_unknown_options_get_clear_errors() -> None:
    with pytest.raises(TypeError, match="feature_source"):
        Dfkdm(feature_source="autoencoder")  # type: ignore[call-arg]  (removed in 0.4.0: use DfkdmLake)
    with pytest.raises(ValueError, match="bandwidth"):
        DfkdmLake(image_size=64, density={"bandwidth": "wide"})
    with pytest.raises(ValueError, match="unknown keys"):
        Dfkdm(density={"knd": "kde"})
    with pytest.raises(ValueError, match="image_size"):
        DfkdmLake(image_size=100, num_downsamples=4)
    with pytest.raises(ValueError, match="map_sigma"):
        DfkdmLake(image_size=64, map_sigma=-1.0)


@pytest.mark.parametrize("model_class", [Dfkdm, DfkdmLake])
def test_an_unfitted_model_refuses_to_test(model_class: type) -> None:
    model = model_class(image_size=32)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.on_test_start()
    with pytest.raises(RuntimeError, match="not fitted"):
        model.on_predict_start()


def test_pre_processor_only_resizes_and_the_backbone_normalises_inside_the_model() -> None:
    from torchvision.transforms.v2 import InterpolationMode

    lake = DfkdmLake(image_size=32, num_downsamples=2, base_channels=8)
    (resize,) = lake.pre_processor.transform.transforms
    assert resize.interpolation == InterpolationMode.NEAREST  # raw [0, 1] images, thin defects kept sharp
    backbone = Dfkdm(image_size=64, layers=["blocks.2"])
    (resize,) = backbone.pre_processor.transform.transforms
    assert type(resize).__name__ == "Resize"
    assert resize.interpolation == InterpolationMode.BILINEAR
    # tf_efficientnet_lite0 was trained on inputs standardised with mean = std = 0.5 (timm's pretrained_cfg)
    torch.testing.assert_close(backbone.model.normalize.mean.flatten(), torch.full((3,), 0.5))
    imagenet = Dfkdm(image_size=64, layers=["blocks.2"], input_normalization="imagenet")
    torch.testing.assert_close(imagenet.model.normalize.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
