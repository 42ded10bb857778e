"""Dfkdm beyond the shared harness: degenerate images, LAKE features, clear errors, calibrated scores."""

from __future__ import annotations

import pytest
import torch

from anomalib_ext.models import Dfkdm
from anomalib_ext.models.dfkdm.torch_model import DfkdmModel, reconstruction_error_features


def _tiny_lake(**kwargs) -> DfkdmModel:
    defaults = {
        "feature_source": "autoencoder",
        "image_size": 32,
        "latent_dim": 4,
        "base_channels": 8,
        "num_downsamples": 2,
        "n_components": 0,
        "density": "kde",
    }
    return Dfkdm(**{**defaults, **kwargs}, visualizer=False).model


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


@pytest.mark.parametrize("density", ["kde", "gaussian"])
def test_lake_on_constant_images_gives_no_nan(density: str) -> None:
    torch.manual_seed(0)
    model = _tiny_lake(density=density).eval()
    constant = torch.full((12, 3, 32, 32), 0.5)
    with torch.no_grad():
        model.density.fit(model.extract_features(constant))
        normal = model(constant[:2])
        other = model(torch.zeros(2, 3, 32, 32))
    for output in (normal, other):
        assert torch.isfinite(output.pred_score).all()
        assert torch.isfinite(output.anomaly_map).all()
        assert output.anomaly_map.shape == (2, 1, 32, 32)
    assert (other.pred_score > normal.pred_score).all()


def test_calibrated_scores_lie_in_unit_interval_and_keep_the_ranking() -> None:
    torch.manual_seed(0)
    raw_model = _tiny_lake().eval()
    calibrated_model = _tiny_lake(calibrate=True).eval()
    calibrated_model.load_state_dict(raw_model.state_dict())
    images = torch.rand(16, 3, 32, 32) * 0.1 + 0.4
    queries = torch.cat([images[:4], torch.rand(4, 3, 32, 32)])
    with torch.no_grad():
        raw_model.density.fit(raw_model.extract_features(images))
        calibrated_model.load_state_dict(raw_model.state_dict())
        raw = raw_model(queries).pred_score
        calibrated = calibrated_model(queries).pred_score
    assert float(calibrated.min()) >= 0.0
    assert float(calibrated.max()) <= 1.0
    in_raw_order = calibrated[torch.argsort(raw)]
    assert (in_raw_order[1:] >= in_raw_order[:-1]).all()  # monotone (the logistic may saturate to ties)
    assert float(calibrated[4:].min()) > float(calibrated[:4].max())


def test_unknown_options_get_clear_errors() -> None:
    with pytest.raises(ValueError, match="feature_source"):
        Dfkdm(feature_source="pixels")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bandwidth"):
        Dfkdm(feature_source="autoencoder", image_size=64, bandwidth="wide")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_size"):
        Dfkdm(feature_source="autoencoder", image_size=100, num_downsamples=4)


def test_an_unfitted_model_refuses_to_test() -> None:
    model = Dfkdm(feature_source="autoencoder", image_size=32, num_downsamples=2, base_channels=8)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.on_test_start()


def test_pre_processor_only_resizes_and_the_backbone_normalises_inside_the_model() -> None:
    from torchvision.transforms.v2 import InterpolationMode

    lake = Dfkdm(feature_source="autoencoder", image_size=32, num_downsamples=2, base_channels=8)
    (resize,) = lake.pre_processor.transform.transforms
    assert resize.interpolation == InterpolationMode.NEAREST  # raw [0, 1] images, thin defects kept sharp
    backbone = Dfkdm(feature_source="backbone", image_size=64, layers=["blocks.2"])
    assert [type(step).__name__ for step in backbone.pre_processor.transform.transforms] == ["Resize"]
    # tf_efficientnet_lite0 was trained on inputs standardised with mean = std = 0.5 (timm's pretrained_cfg)
    torch.testing.assert_close(backbone.model.normalize.mean.flatten(), torch.full((3,), 0.5))
    imagenet = Dfkdm(feature_source="backbone", image_size=64, layers=["blocks.2"], input_normalization="imagenet")
    torch.testing.assert_close(imagenet.model.normalize.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
