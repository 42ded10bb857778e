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
    ExtModelMixin,
    ImageSize,
    ImageTiling,
    MapMoments,
    gather_objects,
    is_distributed,
    sum_across_ranks,
)
from anomalib_ext.models.components.training_budget import DEFAULT_MIN_STEPS, ensure_min_steps

from .loss import LossWeights, build_loss
from .torch_model import MapMode, ReconstructionModel, Variant


class Reconstruction(ExtModelMixin, AnomalibModule):
    """Autoencoder / VAE anomaly detector (see README.md).

    Args:
        variant: ``ae`` (plain autoencoder) or ``vae`` (variational; scores with its mean reconstruction).
        image_size: side length (or (height, width)) the pre-processor resizes to and the network is built for;
            divisible by ``2 ** num_downsamples``.
        latent_dim: size of the bottleneck code; small enough that defects cannot be copied through.
        base_channels: width of the first encoder stage (doubled per stage, capped at 8x).
        num_downsamples: stride-2 stages of the encoder (the decoder mirrors them).
        loss_weights: ``LossWeights`` or a mapping of its keys: ``l2`` (MSE), ``ssim`` (1 - SSIM) and ``kl``
            (the VAE's KL divergence), defaults 1.0, 1.0, 1e-4.
        anomaly_map_mode: ``ssim`` (1 - local SSIM of input and reconstruction) or ``l2`` (squared residual
            averaged over channels). Either map is then smoothed and standardised per pixel by the mean and
            spread of the training images' maps there (gathered during each training epoch from the
            reconstructions the loss already computed).
        map_sigma: Gaussian blur of the anomaly map, pixels (0 = none).
        topk_fraction: image score = mean of the top ``topk_fraction`` of map pixels, in (0, 1].
        learning_rate: Adam's learning rate.
        image_tiling: ``ImageTiling`` or a mapping of its keys (``tile_size``, ``stride``, ``tile_batch``): the
            network is built for and trained on tiles of a large ``image_size``, its reconstructions stitched.
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
    # optimiser steps a fit takes at least: a few dozen images make one batch an epoch, and a config's max_epochs
    # then trains a handful of steps (bottle at 10 normals, 4 steps: pixel AUROC 0.50-0.58; 50 steps: 0.79)
    min_steps: ClassVar[int] = DEFAULT_MIN_STEPS
    # nearest neighbour keeps thin defects sharp, and no Normalize: the sigmoid output lives in [0, 1]
    resize_interpolation: ClassVar[InterpolationMode] = InterpolationMode.NEAREST

    def __init__(
        self,
        variant: Variant = "ae",
        image_size: ImageSize = 128,
        latent_dim: int = 128,
        base_channels: int = 32,
        num_downsamples: int = 4,
        loss_weights: LossWeights = LossWeights(),  # noqa: B008  (frozen: a shared default is safe)
        anomaly_map_mode: MapMode = "ssim",
        map_sigma: float = 2.0,
        topk_fraction: float = 0.01,
        learning_rate: float = 1e-3,
        image_tiling: ImageTiling = ImageTiling(),  # noqa: B008
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
                map_sigma=map_sigma,
                topk_fraction=topk_fraction,
                image_tiling=ImageTiling.coerce(image_tiling),
            )
            self.loss = build_loss(LossWeights.coerce(loss_weights))
        except ValueError as error:
            msg = f"Reconstruction: {error}"
            raise ValueError(msg) from None
        self.learning_rate = learning_rate

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.learning_rate)

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
        """One reconstruction step on normal images; their maps feed the per-pixel statistics."""
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
        self.model.accumulate(batch.image, output)
        return {"loss": terms["loss"]}

    def _fit_map_statistics(self) -> None:
        """The torch model fits the epoch's maps; under DDP each rank summed its own shard, so the sums are added up
        over the ranks first and every rank (and the checkpoint) holds the statistics of the whole training set."""
        self.model.fit(self._moments_across_ranks())

    def _moments_across_ranks(self) -> MapMoments:
        """The epoch's map sums over all DDP ranks (this rank's own on one process)."""
        moments = self.model.map_moments
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

    def on_train_start(self) -> None:
        """Few images make few optimiser steps: train at least ``min_steps`` (one warning line when it acts)."""
        ensure_min_steps(self.trainer, "Reconstruction", self.min_steps)

    def on_train_epoch_start(self) -> None:
        self.model.reset_map_moments()

    def on_validation_epoch_start(self) -> None:
        # Lightning validates at the end of a training epoch, before on_train_epoch_end: fit first so
        # the post-processor's statistics see the same maps as inference will
        self._fit_map_statistics()

    def on_train_epoch_end(self) -> None:
        self._fit_map_statistics()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Scores and maps for the post-processor's threshold and normalisation statistics."""
        self._check_images(batch.image)
        return super().validation_step(batch, *args, **kwargs)
