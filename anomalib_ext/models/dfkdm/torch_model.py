"""Dfkdm and DfkdmLake in plain torch: features of an image, a density of normal features, score = negative log density.

Two torch models, one per Lightning class, sharing the density (``DensitySettings`` -> ``FeatureDensity``):

- ``DfkdmModel``: global-average-pooled activations of the chosen layers of a pretrained timm backbone
  (offline weights), concatenated. Image-level model, like anomalib's Dfkde: no anomaly map. With
  ``image_tiling`` each tile of the full-resolution image is pooled on its own: the density is fitted on every
  tile of every training image and an image scores its worst tile, so a defect of a few pixels moves one tile's
  vector instead of vanishing in the whole image's average.
- ``LakeModel`` (LAKE): the latent code of a convolutional autoencoder trained on normal images, plus
  reconstruction-error features: LAKE's relative L2 error ``|x - x_hat| / |x|`` and cosine similarity (of the
  mean-centred image and reconstruction), and the peak of the smoothed residual map (mean of its top 1 %),
  which sees small defects that barely move the global error. The anomaly map is that smoothed squared
  residual.

Each owns what it learns: ``fit(features)`` fits the density on normal feature vectors (the Lightning class
collects them and merges the DDP ranks). Everything learnt (autoencoder weights, scaler, PCA, density) is a
parameter or buffer, and ``forward`` in eval mode has no data-dependent control flow, so the whole model exports
to OpenVINO.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.models.components import (
    GaussianBlur,
    ImageTiling,
    InputNormalization,
    InputNormalizer,
    build_feature_extractor,
    topk_mean,
)
from anomalib_ext.models.components.autoencoder import AutoencoderOutput, ConvAutoencoder
from anomalib_ext.models.components.kde import BandwidthRule, DensityKind, FeatureDensity, ScalingMethod
from anomalib_ext.models.components.settings import Settings

logger = logging.getLogger(__name__)

RECONSTRUCTION_FEATURES = 3  # relative L2 error, centred cosine similarity, residual-map peak
PEAK_FRACTION = 0.01
_EPS = 1e-6


@dataclass(frozen=True)
class DensitySettings(Settings):
    """The density both models fit on their feature vectors (one nested ``density:`` key in a config).

    Args:
        kind: ``kde`` or ``gaussian``: the density inside the PCA subspace.
        bandwidth: KDE bandwidth rule ``scott``, ``silverman``, ``loo`` (max leave-one-out likelihood) or a
            positive factor; used by ``kind: kde`` only (still checked, so a typo fails early).
        n_components: PCA components: a count, a fraction of the variance in (0, 1), or ``<= 0`` (no reduction).
            In ``DfkdmLake`` PCA applies to the latent code only; the reconstruction-error features bypass it.
        residual: add the log density of the residual outside the kept components (isotropic Gaussian with
            probabilistic PCA's variance): with ``kind: gaussian`` the score is the probabilistic-PCA negative log
            likelihood, in-subspace Mahalanobis distance + residual / sigma^2. No effect without PCA.
        feature_scaling: ``standardize``, ``scale`` (anomalib's max norm), ``norm`` (unit length) or ``none``,
            before PCA.
        max_training_points: cap on the points the density is fitted on (random, seeded sample).
    """

    kind: DensityKind = "gaussian"
    bandwidth: BandwidthRule | float = "loo"
    n_components: int | float = 0.97
    residual: bool = True
    feature_scaling: ScalingMethod = "standardize"
    max_training_points: int = 2000

    def build(self, passthrough: int = 0) -> FeatureDensity:
        """The ``FeatureDensity`` these settings describe; the last ``passthrough`` features skip PCA."""
        return FeatureDensity(
            density=self.kind,
            bandwidth=self.bandwidth,
            n_components=self.n_components,
            residual=self.residual,
            feature_scaling=self.feature_scaling,
            max_training_points=self.max_training_points,
            passthrough=passthrough,
        )


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


class _DensityScorer(nn.Module):
    """The density half both models share: ``fit`` on normal features, score = negative log density."""

    def __init__(self, density: DensitySettings, calibrate: bool, passthrough: int = 0) -> None:
        super().__init__()
        self.density = density.build(passthrough)
        self.calibrate = calibrate

    family = "Dfkdm"  # the name the user knows, for the log
    fit_unit = "images"  # what one feature vector stands for, for the log

    def fit(self, features: torch.Tensor) -> int:
        """Fit the density on normal feature vectors (N, D); returns how many it used (at most the cap).

        Says in one warning when the images are no more than the feature dimensions: the density then had to be
        shrunk (``FeatureDensity``), and the user should know the model runs on less than its settings assume.
        """
        used = self.density.fit(features.flatten(0, -2))  # per-tile vectors (N, tiles, D) are fit points too
        density = self.density
        if density.shrunk:
            logger.warning(
                "%s: %d training %s for %d feature dimensions: their covariance is singular, so the density "
                "shrinks it towards its mean variance (Ledoit-Wolf, intensity %.2f; PCA keeps %d components); "
                "the shrinkage stops above %d training %s",
                self.family,
                density.fit_points,
                self.fit_unit,
                density.fit_dims,
                density.shrinkage,
                density.pca.output_dim - density.pca.passthrough,
                density.fit_dims,
                self.fit_unit,
            )
        return used

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Negative log density of the features, or its calibrated [0, 1] version."""
        negative_log_density = self.density(features)
        return self.density.calibrated_score(negative_log_density) if self.calibrate else negative_log_density


class DfkdmModel(_DensityScorer):
    """Pooled pretrained-backbone features followed by a ``FeatureDensity``, on raw [0, 1] images.

    The arguments are ``Dfkdm``'s (documented there), ``image_size`` as an ``(H, W)`` pair (needed with tiling).
    """

    def __init__(
        self,
        *,
        backbone: str,
        layers: Sequence[str],
        input_normalization: InputNormalization,
        pre_trained: bool,
        density: DensitySettings,
        calibrate: bool,
        image_tiling: ImageTiling | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(density, calibrate)
        if not layers:
            msg = "layers must name at least one backbone layer"
            raise ValueError(msg)
        self.normalize = InputNormalizer.for_backbone(backbone, input_normalization)
        self.feature_extractor = build_feature_extractor(backbone, layers, pre_trained=pre_trained)
        self.image_tiling = image_tiling or ImageTiling()
        self.image_tiling.check(image_size)
        if self.image_tiling.enabled:
            self.fit_unit = "tiles"

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """Concatenated global-average-pooled backbone activations of normalised images: (N, sum of channels)."""
        layer_outputs = self.feature_extractor(images)
        return torch.cat([F.adaptive_avg_pool2d(output, 1).flatten(1) for output in layer_outputs.values()], dim=1)

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled features of [0, 1] images, (N, D); with tiling, of each tile: (N, tiles, D)."""
        self.feature_extractor.eval()  # frozen: BatchNorm statistics must not move during "training"
        normalized = self.normalize(images)  # per_image normalisation sees the whole image, as untiled
        if not self.image_tiling.enabled:
            return self.pooled_features(normalized)
        per_tile = self.image_tiling.run(self.pooled_features, normalized)  # (N * tiles, D), image-major
        return per_tile.view(images.shape[0], -1, per_tile.shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Training mode: the features (to collect for ``fit``). Eval mode: ``InferenceBatch`` with the scores
        (tiled: the worst tile's)."""
        features = self.extract_features(images)
        if self.training:
            return features
        if features.dim() == 2:
            return InferenceBatch(pred_score=self.score(features))
        tile_scores = self.score(features.flatten(0, 1)).view(features.shape[:2])
        return InferenceBatch(pred_score=tile_scores.amax(dim=1))


class LakeModel(_DensityScorer):
    """LAKE: a ``ConvAutoencoder``'s latent code plus reconstruction-error features, then a ``FeatureDensity``.

    The arguments are ``DfkdmLake``'s (documented there). The autoencoder takes RGB images of ``image_size``.
    """

    family = "DfkdmLake"

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        latent_dim: int,
        base_channels: int,
        num_downsamples: int,
        density: DensitySettings,
        calibrate: bool,
        map_sigma: float,
    ) -> None:
        super().__init__(density, calibrate, passthrough=RECONSTRUCTION_FEATURES)
        if map_sigma < 0:
            msg = f"map_sigma={map_sigma} must be >= 0"
            raise ValueError(msg)
        self.autoencoder = ConvAutoencoder(
            in_channels=3,
            image_size=image_size,
            latent_dim=latent_dim,
            base_channels=base_channels,
            num_downsamples=num_downsamples,
        )
        self.smoothing = GaussianBlur(map_sigma)

    def residual_map(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Squared reconstruction residual, averaged over channels and smoothed: (N, 1, H, W)."""
        return self.smoothing((images - reconstruction).pow(2).mean(dim=1, keepdim=True))

    def lake_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent code plus the reconstruction-error features, and the residual map."""
        output: AutoencoderOutput = self.autoencoder(images)
        residual = self.residual_map(images, output.reconstruction)
        errors = reconstruction_error_features(images, output.reconstruction, residual)
        return torch.cat([output.latent, errors], dim=1), residual

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """The feature vectors the density is fitted on, (N, D), from the network as it is now (no gradients,
        eval mode, training mode restored): the fit happens after the autoencoder has trained."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            features = self.lake_features(images)[0]
        self.train(was_training)
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Training mode: the features. Eval mode: ``InferenceBatch`` with the scores and the residual map."""
        features, anomaly_map = self.lake_features(images)
        if self.training:
            return features
        return InferenceBatch(pred_score=self.score(features), anomaly_map=anomaly_map)
