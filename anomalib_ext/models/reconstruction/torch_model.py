"""Pure-torch Reconstruction model: autoencoder / VAE, then an anomaly map from the reconstruction error.

In training mode ``forward`` returns the autoencoder's output (for the loss); in eval mode it returns
anomalib's ``InferenceBatch``. Nothing in the eval path depends on data values, so it exports to OpenVINO.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.models.components import AutoencoderOutput, ConvAutoencoder, SSIMMap, topk_mean

Variant = Literal["ae", "vae"]
MapMode = Literal["ssim", "l2"]
VARIANTS: tuple[str, ...] = ("ae", "vae")
MAP_MODES: tuple[str, ...] = ("ssim", "l2")


class GaussianSmoothing(nn.Module):
    """Separable Gaussian blur of a (N, 1, H, W) map; ``sigma <= 0`` leaves the map alone.

    Reconstruction residuals are speckled by noise and fine texture; blurring before scoring makes a
    defect (a connected region) stand out from isolated hot pixels.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = float(sigma)
        radius = max(1, math.ceil(3 * sigma)) if sigma > 0 else 0
        coords = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(coords**2) / (2 * max(sigma, 1e-6) ** 2))
        self.register_buffer("kernel", (kernel / kernel.sum()).view(1, 1, 1, -1), persistent=False)
        self.radius = radius

    def forward(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        if self.radius == 0:
            return anomaly_map
        r = self.radius
        # replicate padding: valid for any map size (reflect needs the map larger than the kernel radius)
        horizontal = F.conv2d(F.pad(anomaly_map, (r, r, 0, 0), mode="replicate"), self.kernel)
        return F.conv2d(F.pad(horizontal, (0, 0, r, r), mode="replicate"), self.kernel.transpose(2, 3))


class ReconstructionModel(nn.Module):
    """Autoencoder (``ae``) or VAE (``vae``) scored by how badly it reconstructs each pixel.

    Args:
        variant: ``ae`` or ``vae``. The VAE reconstructs from its mean code at inference (deterministic).
        image_size: side length (or (height, width)) of the images the network sees.
        latent_dim, base_channels, num_downsamples: network size, see ``ConvAutoencoder``.
        in_channels: image channels.
        anomaly_map_mode: ``ssim`` (1 - local SSIM of input and reconstruction) or ``l2`` (squared residual
            averaged over channels).
        ssim_window_size: side of the SSIM Gaussian window (odd).
        smoothing_sigma: Gaussian blur of the map in pixels (0 = none).
        topk_fraction: the image score is the mean of the highest ``topk_fraction`` of map pixels.
        normalize_map: standardise each pixel of the map by the mean and spread of normal images' maps at that
            pixel (buffers set by ``set_map_statistics`` after training). Parts that are always hard to
            reconstruct (edges, fine texture) then stop dominating the map; identity until set.
    """

    def __init__(
        self,
        variant: Variant = "ae",
        image_size: int | tuple[int, int] = 128,
        latent_dim: int = 128,
        base_channels: int = 32,
        num_downsamples: int = 4,
        in_channels: int = 3,
        anomaly_map_mode: MapMode = "ssim",
        ssim_window_size: int = 11,
        smoothing_sigma: float = 2.0,
        topk_fraction: float = 0.01,
        normalize_map: bool = True,
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
        if smoothing_sigma < 0:
            msg = f"smoothing_sigma must be >= 0, got {smoothing_sigma}"
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
        self.ssim = SSIMMap(window_size=ssim_window_size)
        self.smoothing = GaussianSmoothing(smoothing_sigma)
        self.normalize_map = normalize_map
        height, width = self.autoencoder.image_size
        self.register_buffer("map_mean", torch.zeros(1, 1, height, width))
        self.register_buffer("map_scale", torch.ones(1, 1, height, width))

    @torch.no_grad()
    def set_map_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store normal images' per-pixel map mean and spread, (H, W) or (1, 1, H, W) each.

        The spread is floored by its own average over the image, so pixels where normal images are always
        reconstructed perfectly (flat background) do not turn noise into huge scores.
        """
        mean = mean.reshape(self.map_mean.shape).to(self.map_mean)
        std = std.reshape(self.map_scale.shape).to(self.map_scale).clamp(min=0)
        floor = std.mean().clamp(min=1e-6)
        self.map_mean.copy_(mean)
        self.map_scale.copy_(std + floor)

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
            anomaly_map = (anomaly_map - self.map_mean) / self.map_scale
        return anomaly_map

    def forward(self, images: torch.Tensor) -> AutoencoderOutput | InferenceBatch:
        """Autoencoder output in training mode; ``InferenceBatch`` (score and map) in eval mode."""
        output = self.autoencoder(images)
        if self.training:
            return output
        anomaly_map = self.anomaly_map(images, output.reconstruction)
        return InferenceBatch(pred_score=topk_mean(anomaly_map, self.topk_fraction), anomaly_map=anomaly_map)
