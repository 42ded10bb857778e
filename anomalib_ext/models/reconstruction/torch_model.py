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
    ImageTiling,
    MapMoments,
    MapStandardizer,
    SSIMMap,
    topk_mean,
)
from anomalib_ext.models.components.stats import check_topk_fraction

Variant = Literal["ae", "vae"]
MapMode = Literal["ssim", "l2"]
VARIANTS: tuple[str, ...] = ("ae", "vae")
MAP_MODES: tuple[str, ...] = ("ssim", "l2")


class ReconstructionModel(nn.Module):
    """Autoencoder (``ae``) or VAE (``vae``) scored by how badly it reconstructs each pixel.

    The arguments are ``Reconstruction``'s, documented there with their defaults; ``in_channels`` is the images'
    channels. What it learns without gradients is the per-pixel standardisation of the map (``map_stats``):
    ``accumulate`` adds each training batch's raw maps to running sums, ``fit`` turns the sums into the
    statistics. Parts that are always hard to reconstruct (edges, fine texture) then stop dominating the map.
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
        map_sigma: float,
        topk_fraction: float,
        image_tiling: ImageTiling | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            msg = f"variant must be one of {VARIANTS}, got {variant!r}"
            raise ValueError(msg)
        if anomaly_map_mode not in MAP_MODES:
            msg = f"anomaly_map_mode must be one of {MAP_MODES}, got {anomaly_map_mode!r}"
            raise ValueError(msg)
        if map_sigma < 0:
            msg = f"map_sigma must be >= 0, got {map_sigma}"
            raise ValueError(msg)
        self.variant = variant
        self.anomaly_map_mode = anomaly_map_mode
        self.topk_fraction = check_topk_fraction(topk_fraction)
        # with tiling, the autoencoder is built for (and trained on) tiles; its reconstructions are stitched
        self.image_tiling = image_tiling or ImageTiling()
        self.image_tiling.check(tuple(image_size))
        network_size = image_size if self.image_tiling.tile_size is None else self.image_tiling.tile_size
        self.autoencoder = ConvAutoencoder(
            in_channels=in_channels,
            image_size=network_size,
            latent_dim=latent_dim,
            base_channels=base_channels,
            num_downsamples=num_downsamples,
            variational=variant == "vae",
        )
        self.ssim = SSIMMap()  # the standard window, as the loss's
        # replicate padding: valid for any map size. Residuals are speckled by noise and fine texture; blurring
        # before scoring makes a defect (a connected region) stand out from isolated hot pixels
        self.smoothing = GaussianBlur(map_sigma, padding="replicate")
        # identity until fitted; the spread is floored by its own average over the image, so pixels where normal
        # images are always reconstructed perfectly (flat background) do not turn noise into huge scores
        self.map_stats = MapStandardizer(floor="mean", min_scale=1e-6, shape=(1, 1, *image_size))
        # running sums of the training maps since the last ``fit`` (not state: only ``map_stats`` is kept)
        self.map_moments = MapMoments()

    @torch.no_grad()
    def accumulate(self, images: torch.Tensor, output: AutoencoderOutput) -> None:
        """Add one training batch's raw maps to the running sums.

        The AE's training reconstruction is exactly its inference one (no dropout, GroupNorm), so it is reused;
        the VAE decodes its mean code once more, as it does at inference.
        """
        reconstruction = output.reconstruction
        if output.mu is not None and self.image_tiling.enabled:  # the mean code of every tile, stitched
            was_training = self.autoencoder.training
            self.autoencoder.eval()  # a VAE decodes its mean code in eval mode
            reconstruction = self.reconstruct(images).reconstruction
            self.autoencoder.train(was_training)
        elif output.mu is not None:
            reconstruction = self.autoencoder.decode(output.mu)
        self.map_moments.add(self.raw_anomaly_map(images, reconstruction.detach()))

    def reset_map_moments(self) -> None:
        """Forget the maps accumulated since the last ``fit`` (a new epoch starts)."""
        self.map_moments = MapMoments()

    @torch.no_grad()
    def fit(self, moments: MapMoments | None = None) -> bool:
        """Per-pixel mean and spread of the training maps, then a fresh accumulation; ``False`` (and nothing
        changes) with fewer than 2 maps.

        Args:
            moments: the sums to fit (the Lightning model passes them merged over DDP ranks); default: this
                model's own ``map_moments``.
        """
        moments = self.map_moments if moments is None else moments
        if moments.total < 2:
            return False
        self.map_stats.fit(moments)
        self.reset_map_moments()
        return True

    def raw_anomaly_map(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) smoothed reconstruction error before per-pixel standardisation; >= 0."""
        if self.anomaly_map_mode == "ssim":
            residual = (1 - self.ssim(images, reconstruction)).clamp(min=0)
        else:
            residual = ((images - reconstruction) ** 2).mean(dim=1, keepdim=True)
        return self.smoothing(residual)

    def anomaly_map(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) anomaly map: the smoothed error, standardised per pixel (identity until ``fit``)."""
        return self.map_stats(self.raw_anomaly_map(images, reconstruction))

    def reconstruct(self, images: torch.Tensor) -> AutoencoderOutput:
        """The autoencoder's output for whole images: run on tiles and stitched when ``image_tiling`` is on (its
        codes are then one per tile)."""
        return self.image_tiling.run(self.autoencoder, images)

    def forward(self, images: torch.Tensor) -> AutoencoderOutput | InferenceBatch:
        """Autoencoder output in training mode; ``InferenceBatch`` (score and map) in eval mode."""
        output = self.reconstruct(images)
        if self.training:
            return output
        anomaly_map = self.anomaly_map(images, output.reconstruction)
        return InferenceBatch(pred_score=topk_mean(anomaly_map, self.topk_fraction), anomaly_map=anomaly_map)
