"""Dfkdm in plain torch: features of an image, a density of normal features, score = negative log density.

Two feature sources:

- ``backbone``: global-average-pooled activations of the chosen layers of a pretrained timm backbone
  (offline weights), concatenated. Image-level model, like anomalib's Dfkde: no anomaly map.
- ``autoencoder`` (LAKE): the latent code of a convolutional autoencoder trained on normal images, plus
  reconstruction-error features: LAKE's relative L2 error ``|x - x_hat| / |x|`` and cosine similarity (of the
  mean-centred image and reconstruction), and the peak of the smoothed residual map (mean of its top 1 %),
  which sees small defects that barely move the global error. The anomaly map is that smoothed squared
  residual.

Everything learnt (autoencoder weights, scaler, PCA, density) is a parameter or buffer, and ``forward`` in
eval mode has no data-dependent control flow, so the whole model exports to OpenVINO.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.models.components import (
    GaussianBlur,
    InputNormalization,
    InputNormalizer,
    build_feature_extractor,
    topk_mean,
)
from anomalib_ext.models.components.autoencoder import AutoencoderOutput, ConvAutoencoder
from anomalib_ext.models.components.kde import BandwidthRule, DensityKind, FeatureDensity, ScalingMethod

FeatureSource = Literal["backbone", "autoencoder"]
FEATURE_SOURCES: tuple[str, ...] = ("backbone", "autoencoder")
RECONSTRUCTION_FEATURES = 3  # relative L2 error, centred cosine similarity, residual-map peak
PEAK_FRACTION = 0.01
_EPS = 1e-6


def reconstruction_error_features(
    images: torch.Tensor, reconstruction: torch.Tensor, residual_map: torch.Tensor
) -> torch.Tensor:
    """Reconstruction features per image, (N, 3): relative L2 error, centred cosine, residual-map peak.

    The first two are LAKE's. The cosine is taken on mean-centred images: raw images are all-positive, so
    their cosine is close to 1 whatever the content (the DfKDM tip against cosine on raw images). Norms are
    floored so a constant image gives finite values, not NaN.
    """
    flat_images = images.flatten(1)
    flat_reconstruction = reconstruction.flatten(1)
    relative_l2 = (flat_images - flat_reconstruction).norm(dim=1) / flat_images.norm(dim=1).clamp_min(_EPS)
    centred_images = flat_images - flat_images.mean(dim=1, keepdim=True)
    centred_reconstruction = flat_reconstruction - flat_reconstruction.mean(dim=1, keepdim=True)
    cosine = (centred_images * centred_reconstruction).sum(dim=1) / (
        centred_images.norm(dim=1) * centred_reconstruction.norm(dim=1)
    ).clamp_min(_EPS)
    peak = topk_mean(residual_map, PEAK_FRACTION)
    return torch.stack([relative_l2, cosine, peak], dim=1)


class DfkdmModel(nn.Module):
    """Feature extractor (backbone or autoencoder) followed by a ``FeatureDensity``, on raw [0, 1] images.

    The arguments are ``Dfkdm``'s (documented there, with their defaults).

    Args:
        feature_source: ``backbone`` or ``autoencoder`` (LAKE).
        backbone, layers, pre_trained: the timm backbone for ``backbone`` mode.
        input_normalization: ``backbone`` (its pretrained mean/std) or ``imagenet``, applied before the backbone.
        image_size, in_channels, latent_dim, base_channels, num_downsamples, variational: the autoencoder
            for ``autoencoder`` mode (see ``ConvAutoencoder``).
        density, bandwidth, n_components, feature_scaling, max_training_points: the density (see
            ``FeatureDensity``). In ``autoencoder`` mode PCA applies to the latent code only; the
            reconstruction-error features bypass it.
        residual: also score what PCA discards (probabilistic PCA: isotropic Gaussian on the residual outside
            the kept components). No effect without PCA (``n_components <= 0``).
        calibrate: report ``sigmoid((nll - median) / spread)`` in [0, 1] instead of the raw negative log
            density. Monotone: AUROC and thresholds on validation data are unaffected.
        map_sigma: standard deviation (pixels) of the Gaussian that smooths the residual map; 0 disables.
    """

    def __init__(
        self,
        *,
        feature_source: FeatureSource,
        backbone: str,
        layers: Sequence[str],
        input_normalization: InputNormalization,
        pre_trained: bool,
        image_size: tuple[int, int],
        in_channels: int,
        latent_dim: int,
        base_channels: int,
        num_downsamples: int,
        variational: bool,
        density: DensityKind,
        bandwidth: BandwidthRule | float,
        n_components: int | float,
        residual: bool,
        feature_scaling: ScalingMethod,
        max_training_points: int,
        calibrate: bool,
        map_sigma: float,
    ) -> None:
        super().__init__()
        if feature_source not in FEATURE_SOURCES:
            msg = f"feature_source={feature_source!r} is not one of {FEATURE_SOURCES}"
            raise ValueError(msg)
        if map_sigma < 0:
            msg = f"map_sigma={map_sigma} must be >= 0"
            raise ValueError(msg)
        self.feature_source = feature_source
        self.calibrate = calibrate
        self.feature_extractor: nn.Module | None = None
        self.normalize: nn.Module | None = None
        self.autoencoder: ConvAutoencoder | None = None
        if feature_source == "backbone":
            if not layers:
                msg = "layers must name at least one backbone layer"
                raise ValueError(msg)
            self.normalize = InputNormalizer.for_backbone(backbone, input_normalization)
            self.feature_extractor = build_feature_extractor(backbone, layers, pre_trained=pre_trained)
        else:
            self.autoencoder = ConvAutoencoder(
                in_channels=in_channels,
                image_size=image_size,
                latent_dim=latent_dim,
                base_channels=base_channels,
                num_downsamples=num_downsamples,
                variational=variational,
            )
        self.density = FeatureDensity(
            density=density,
            bandwidth=bandwidth,
            n_components=n_components,
            residual=residual,
            feature_scaling=feature_scaling,
            max_training_points=max_training_points,
            passthrough=RECONSTRUCTION_FEATURES if feature_source == "autoencoder" else 0,
        )
        self.map_sigma = map_sigma
        self.smoothing = GaussianBlur(map_sigma)

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """Concatenated global-average-pooled backbone activations of [0, 1] images: (N, sum of layer channels)."""
        assert self.feature_extractor is not None and self.normalize is not None
        self.feature_extractor.eval()  # frozen: BatchNorm statistics must not move during "training"
        layer_outputs = self.feature_extractor(self.normalize(images))
        return torch.cat([F.adaptive_avg_pool2d(output, 1).flatten(1) for output in layer_outputs.values()], dim=1)

    def lake_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent code plus the reconstruction-error features, and the residual map."""
        assert self.autoencoder is not None
        output: AutoencoderOutput = self.autoencoder(images)
        residual = self.residual_map(images, output.reconstruction)
        errors = reconstruction_error_features(images, output.reconstruction, residual)
        return torch.cat([output.latent, errors], dim=1), residual

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """The feature vectors the density is fitted on: (N, D)."""
        if self.feature_source == "backbone":
            return self.backbone_features(images)
        return self.lake_features(images)[0]

    def residual_map(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Squared reconstruction residual, averaged over channels and smoothed: (N, 1, H, W)."""
        return self.smoothing((images - reconstruction).pow(2).mean(dim=1, keepdim=True))

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Negative log density of the features, or its calibrated [0, 1] version."""
        negative_log_density = self.density(features)
        return self.density.calibrated_score(negative_log_density) if self.calibrate else negative_log_density

    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Training mode: the features (for the density fit). Eval mode: ``InferenceBatch`` with the scores."""
        if self.feature_source == "backbone":
            features = self.backbone_features(images)
            if self.training:
                return features
            return InferenceBatch(pred_score=self.score(features))
        features, anomaly_map = self.lake_features(images)
        if self.training:
            return features
        return InferenceBatch(pred_score=self.score(features), anomaly_map=anomaly_map)
