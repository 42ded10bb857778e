"""Reconstruction: a convolutional autoencoder or VAE trained on normal images, scored by reconstruction error.

A network that has only ever seen normal parts reconstructs them well and reconstructs defects as the normal
part it expects, so the residual lights up where the defect is. The loss mixes L2 (intensities) and SSIM
(structure), plus a KL term for the VAE; the anomaly map is 1 - local SSIM (or the L2 residual), smoothed,
and the image score is the mean of the map's top pixels.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import InterpolationMode

from anomalib_ext.models.components import (
    AutoencoderOutput,
    ExtModelMixin,
    ImageSize,
    MapMoments,
    ReconstructionLoss,
    gather_objects,
    is_distributed,
    sum_across_ranks,
)

from .torch_model import MapMode, ReconstructionModel, Variant


class Reconstruction(ExtModelMixin, AnomalibModule):
    """Autoencoder / VAE anomaly detector (see README.md).

    Args:
        variant: ``ae`` (plain autoencoder) or ``vae`` (variational; scores with its mean reconstruction).
        image_size: side length (or (height, width)) the pre-processor resizes to and the network is built for;
            divisible by ``2 ** num_downsamples``.
        latent_dim: size of the bottleneck code.
        base_channels: width of the first encoder stage (doubled per stage, capped at 8x).
        num_downsamples: stride-2 stages of the encoder (the decoder mirrors them).
        l2_weight, ssim_weight: weights of the L2 and (1 - SSIM) reconstruction losses.
        beta: weight of the VAE's KL divergence (summed over the code, averaged over the batch).
        anomaly_map_mode: ``ssim`` (1 - local SSIM) or ``l2`` (squared residual).
        ssim_window_size, ssim_sigma: odd side and sigma of the Gaussian SSIM window (loss and map).
        map_sigma: Gaussian blur of the anomaly map, pixels (0 = none).
        topk_fraction: image score = mean of the top ``topk_fraction`` of map pixels.
        normalize_map: standardise each map pixel by the mean and spread of the training images' maps there
            (collected during each training epoch from the reconstructions the loss already computed).
        learning_rate, weight_decay: Adam settings.
        check_data: read every file of the datamodule before fitting and stop with exit status 2 naming the first
            bad one (``False`` skips the check).
        pre_processor, post_processor, evaluator, visualizer: as in every anomalib model. The default
            pre-processor only resizes (nearest neighbour) and does not normalise: the network reconstructs
            raw [0, 1] intensities through a sigmoid.
    """

    # INT8_PTQ quantises the autoencoder (encoder and decoder); the SSIM residual map, its blur, the per-pixel
    # standardisation and the top-k score stay in float (README, "Export and INT8")
    int8_modules: ClassVar[tuple[str, ...]] = ("model.autoencoder",)

    default_image_size: ClassVar[tuple[int, int]] = (128, 128)
    # nearest neighbour keeps thin defects sharp, and no Normalize: the sigmoid output lives in [0, 1]
    resize_interpolation: ClassVar[InterpolationMode] = InterpolationMode.NEAREST

    def __init__(
        self,
        variant: Variant = "ae",
        image_size: ImageSize = 128,
        latent_dim: int = 128,
        base_channels: int = 32,
        num_downsamples: int = 4,
        l2_weight: float = 1.0,
        ssim_weight: float = 1.0,
        beta: float = 1e-4,
        anomaly_map_mode: MapMode = "ssim",
        ssim_window_size: int = 11,
        ssim_sigma: float = 1.5,
        map_sigma: float = 2.0,
        topk_fraction: float = 0.01,
        normalize_map: bool = True,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        check_data: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(image_size, check_data, pre_processor, post_processor, evaluator, visualizer)
        if learning_rate <= 0:
            msg = f"Reconstruction: learning_rate must be > 0, got {learning_rate}"
            raise ValueError(msg)
        try:
            self.model = ReconstructionModel(
                variant=variant,
                image_size=self.image_size,
                latent_dim=latent_dim,
                base_channels=base_channels,
                num_downsamples=num_downsamples,
                anomaly_map_mode=anomaly_map_mode,
                ssim_window_size=ssim_window_size,
                ssim_sigma=ssim_sigma,
                map_sigma=map_sigma,
                topk_fraction=topk_fraction,
                normalize_map=normalize_map,
            )
            self.loss = ReconstructionLoss(
                l2_weight=l2_weight,
                ssim_weight=ssim_weight,
                beta=beta,
                ssim_window_size=ssim_window_size,
                ssim_sigma=ssim_sigma,
            )
        except ValueError as error:
            msg = f"Reconstruction: {error}"
            raise ValueError(msg) from None
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        # running sums of the training images' raw maps in the current epoch (see _commit_map_statistics)
        self._map_moments = MapMoments()

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)

    def _check_images(self, images: torch.Tensor) -> None:
        """Clear error when the data does not fit the network (rather than a shape error deep in a conv)."""
        expected = (self.model.autoencoder.in_channels, *self.image_size)
        if tuple(images.shape[1:]) != expected:
            msg = (
                f"Reconstruction was built for images of shape {expected} (channels, height, width) but got "
                f"{tuple(images.shape[1:])}: set image_size to the pre-processor's output size"
            )
            raise ValueError(msg)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One reconstruction step on normal images."""
        del args, kwargs
        self._check_images(batch.image)
        output = self.model(batch.image)
        terms = self.loss(batch.image, output)
        for name, value in terms.items():
            self.log(
                f"train_{name}",
                value.detach(),
                on_epoch=True,
                on_step=False,
                prog_bar=name == "loss",
                batch_size=len(batch.image),
            )
        if self.model.normalize_map:
            self._accumulate_map_statistics(batch.image, output)
        return {"loss": terms["loss"]}

    @torch.no_grad()
    def _accumulate_map_statistics(self, images: torch.Tensor, output: AutoencoderOutput) -> None:
        """Add this batch's raw maps to the epoch's running sums.

        The AE's training reconstruction is exactly its inference one (no dropout, GroupNorm), so it is
        reused; the VAE decodes its mean code once more, as it does at inference.
        """
        reconstruction = output.reconstruction
        if output.mu is not None:
            reconstruction = self.model.autoencoder.decode(output.mu)
        self._map_moments.add(self.model.raw_anomaly_map(images, reconstruction.detach()))

    def _commit_map_statistics(self) -> None:
        """Turn the epoch's sums into the model's per-pixel mean / spread buffers, then start afresh.

        Under DDP each rank summed the maps of its own shard: the sums are added up over the ranks first, so every
        rank (and the checkpoint) holds the statistics of the whole training set.
        """
        moments = self._ranks_map_moments()
        if moments.total < 2:
            return
        self.model.fit_map_statistics(moments)
        self._map_moments = MapMoments()

    def _ranks_map_moments(self) -> MapMoments:
        """The epoch's map sums over all DDP ranks (this rank's own on one process)."""
        moments = self._map_moments
        if not is_distributed():
            return moments
        shapes = gather_objects(None if moments.sums is None else tuple(moments.sums.shape))
        shape = next((found for found in shapes if found is not None), None)
        merged = MapMoments(moments.groups)
        if shape is None:  # no rank saw a training batch this epoch
            return merged
        zeros = torch.zeros(shape, dtype=torch.float64, device=self.device)
        merged.sums = sum_across_ranks(moments.sums if moments.sums is not None else zeros, self.device)
        merged.squares = sum_across_ranks(moments.squares if moments.squares is not None else zeros, self.device)
        merged.counts = sum_across_ranks(moments.counts.to(self.device), self.device)
        return merged

    def on_train_epoch_start(self) -> None:
        self._map_moments = MapMoments()

    def on_validation_epoch_start(self) -> None:
        # Lightning validates at the end of a training epoch, before on_train_epoch_end: commit first so
        # the post-processor's statistics see the same maps as inference will
        self._commit_map_statistics()

    def on_train_epoch_end(self) -> None:
        self._commit_map_statistics()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Scores and maps for the post-processor's threshold and normalisation statistics."""
        self._check_images(batch.image)
        return super().validation_step(batch, *args, **kwargs)
