"""Pure-torch Reconstruction model: autoencoder / VAE, then an anomaly map from the reconstruction error.

In training mode ``forward`` returns the autoencoder's output (for the loss); in eval mode it returns
anomalib's ``InferenceBatch``. Nothing in the eval path depends on data values, so it exports to OpenVINO.
"""

from __future__ import annotations

from typing import Literal

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_ext.models.components import (
    AutoencoderOutput,
    ConvAutoencoder,
    GaussianBlur,
    MapMoments,
    MapStandardizer,
    SSIMMap,
    topk_mean,
)

Variant = Literal["ae", "vae"]
MapMode = Literal["ssim", "l2"]
VARIANTS: tuple[str, ...] = ("ae", "vae")
MAP_MODES: tuple[str, ...] = ("ssim", "l2")


class ReconstructionModel(nn.Module):
    """Autoencoder (``ae``) or VAE (``vae``) scored by how badly it reconstructs each pixel.

    The arguments are ``Reconstruction``'s (documented there, with their defaults).

    Args:
        variant: ``ae`` or ``vae``. The VAE reconstructs from its mean code at inference (deterministic).
        image_size: side length (or (height, width)) of the images the network sees.
        latent_dim, base_channels, num_downsamples: network size, see ``ConvAutoencoder``.
        in_channels: image channels.
        anomaly_map_mode: ``ssim`` (1 - local SSIM of input and reconstruction) or ``l2`` (squared residual
            averaged over channels).
        ssim_window_size, ssim_sigma: the SSIM Gaussian window (odd side, sigma).
        map_sigma: Gaussian blur of the map in pixels (0 = none), replicate padding (valid for any map size).
            Reconstruction residuals are speckled by noise and fine texture; blurring before scoring makes a
            defect (a connected region) stand out from isolated hot pixels.
        topk_fraction: the image score is the mean of the highest ``topk_fraction`` of map pixels.
        normalize_map: standardise each pixel of the map by the mean and spread of normal images' maps at that
            pixel (``map_stats``, fitted by ``fit_map_statistics`` after training). Parts that are always hard to
            reconstruct (edges, fine texture) then stop dominating the map; identity until set.
    """

    def __init__(
        self,
        *,
        variant: Variant,
        image_size: tuple[int, int],
        latent_dim: int,
        base_channels: int,
        num_downsamples: int,
        anomaly_map_mode: MapMode,
        ssim_window_size: int,
        ssim_sigma: float,
        map_sigma: float,
        topk_fraction: float,
        normalize_map: bool,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            msg = f"variant must be one of {VARIANTS}, got {variant!r}"
            raise ValueError(msg)
        if anomaly_map_mode not in MAP_MODES:
            msg = f"anomaly_map_mode must be one of {MAP_MODES}, got {anomaly_map_mode!r}"
            raise ValueError(msg)
        if not 0 < topk_fraction <= 1:
            msg = f"topk_fraction must be in (0, 1], got {topk_fraction}"
            raise ValueError(msg)
        if map_sigma < 0:
            msg = f"map_sigma must be >= 0, got {map_sigma}"
            raise ValueError(msg)
        self.variant = variant
        self.anomaly_map_mode = anomaly_map_mode
        self.topk_fraction = topk_fraction
        self.autoencoder = ConvAutoencoder(
            in_channels=in_channels,
            image_size=image_size,
            latent_dim=latent_dim,
            base_channels=base_channels,
            num_downsamples=num_downsamples,
            variational=variant == "vae",
        )
        self.ssim = SSIMMap(ssim_window_size, ssim_sigma)
        self.smoothing = GaussianBlur(map_sigma, padding="replicate")
        self.normalize_map = normalize_map
        # identity until fitted; the spread is floored by its own average over the image, so pixels where normal
        # images are always reconstructed perfectly (flat background) do not turn noise into huge scores
        self.map_stats = MapStandardizer(floor="mean", min_scale=1e-6, shape=(1, 1, *self.autoencoder.image_size))

    @torch.no_grad()
    def fit_map_statistics(self, moments: MapMoments) -> None:
        """Per-pixel mean and spread of normal images' raw maps (accumulated with ``raw_anomaly_map``)."""
        self.map_stats.fit(moments)

    def raw_anomaly_map(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) smoothed reconstruction error before per-pixel standardisation; >= 0."""
        if self.anomaly_map_mode == "ssim":
            residual = (1 - self.ssim(images, reconstruction)).clamp(min=0)
        else:
            residual = ((images - reconstruction) ** 2).mean(dim=1, keepdim=True)
        return self.smoothing(residual)

    def anomaly_map(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) anomaly map: the smoothed error, standardised per pixel when ``normalize_map``."""
        anomaly_map = self.raw_anomaly_map(images, reconstruction)
        if self.normalize_map:
            anomaly_map = self.map_stats(anomaly_map)
        return anomaly_map

    def forward(self, images: torch.Tensor) -> AutoencoderOutput | InferenceBatch:
        """Autoencoder output in training mode; ``InferenceBatch`` (score and map) in eval mode."""
        output = self.autoencoder(images)
        if self.training:
            return output
        anomaly_map = self.anomaly_map(images, output.reconstruction)
        return InferenceBatch(pred_score=topk_mean(anomaly_map, self.topk_fraction), anomaly_map=anomaly_map)
