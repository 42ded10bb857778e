"""Reconstruction: a convolutional autoencoder or VAE trained on normal images, scored by reconstruction error.

A network that has only ever seen normal parts reconstructs them well and reconstructs defects as the normal
part it expects, so the residual lights up where the defect is. The loss mixes L2 (intensities) and SSIM
(structure), plus a KL term for the VAE; the anomaly map is 1 - local SSIM (or the L2 residual), smoothed,
and the image score is the mean of the map's top pixels.
"""

from __future__ import annotations

from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import Compose, InterpolationMode, Resize

from anomalib_ext.models.components import AutoencoderOutput, InterruptStatusMixin, ReconstructionLoss
from anomalib_ext.models.components.export import ExportDefaultsMixin
from anomalib_ext.models.components.sizes import as_pair

from .torch_model import MapMode, ReconstructionModel, Variant


class Reconstruction(InterruptStatusMixin, ExportDefaultsMixin, AnomalibModule):
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
        ssim_window_size: odd side of the Gaussian SSIM window (loss and map).
        smoothing_sigma: Gaussian blur of the anomaly map, pixels (0 = none).
        topk_fraction: image score = mean of the top ``topk_fraction`` of map pixels.
        normalize_map: standardise each map pixel by the mean and spread of the training images' maps there
            (collected during each training epoch from the reconstructions the loss already computed).
        learning_rate, weight_decay: Adam settings.
        pre_processor, post_processor, evaluator, visualizer: as in every anomalib model. The default
            pre-processor only resizes (nearest neighbour) and does not normalise: the network reconstructs
            raw [0, 1] intensities through a sigmoid.
    """

    def __init__(
        self,
        variant: Variant = "ae",
        image_size: int | tuple[int, int] = 128,
        latent_dim: int = 128,
        base_channels: int = 32,
        num_downsamples: int = 4,
        l2_weight: float = 1.0,
        ssim_weight: float = 1.0,
        beta: float = 1e-4,
        anomaly_map_mode: MapMode = "ssim",
        ssim_window_size: int = 11,
        smoothing_sigma: float = 2.0,
        topk_fraction: float = 0.01,
        normalize_map: bool = True,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        size = as_pair(image_size)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(size)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        if learning_rate <= 0:
            msg = f"Reconstruction: learning_rate must be > 0, got {learning_rate}"
            raise ValueError(msg)
        try:
            self.model = ReconstructionModel(
                variant=variant,
                image_size=size,
                latent_dim=latent_dim,
                base_channels=base_channels,
                num_downsamples=num_downsamples,
                anomaly_map_mode=anomaly_map_mode,
                ssim_window_size=ssim_window_size,
                smoothing_sigma=smoothing_sigma,
                topk_fraction=topk_fraction,
                normalize_map=normalize_map,
            )
            self.loss = ReconstructionLoss(
                l2_weight=l2_weight,
                ssim_weight=ssim_weight,
                beta=beta,
                ssim_window_size=ssim_window_size,
            )
        except ValueError as error:
            msg = f"Reconstruction: {error}"
            raise ValueError(msg) from None
        self.image_size = size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        # running sums of the training images' raw maps in the current epoch (see _commit_map_statistics)
        self._map_sum: torch.Tensor | None = None
        self._map_square_sum: torch.Tensor | None = None
        self._map_count = 0

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | int | None = None) -> PreProcessor:
        """Nearest-neighbour resize, no Normalize: the sigmoid output lives in the input's [0, 1] range."""
        size = as_pair(image_size) if image_size is not None else (128, 128)
        return PreProcessor(transform=Compose([Resize(size, interpolation=InterpolationMode.NEAREST)]))

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
        maps = self.model.raw_anomaly_map(images, reconstruction.detach()).double()
        if self._map_sum is None or self._map_count == 0:
            self._map_sum = torch.zeros_like(maps[0])
            self._map_square_sum = torch.zeros_like(maps[0])
        self._map_sum += maps.sum(dim=0)
        self._map_square_sum += (maps * maps).sum(dim=0)
        self._map_count += maps.shape[0]

    def _commit_map_statistics(self) -> None:
        """Turn the epoch's sums into the model's per-pixel mean / spread buffers, then start afresh."""
        if self._map_count < 2 or self._map_sum is None or self._map_square_sum is None:
            return
        mean = self._map_sum / self._map_count
        variance = (self._map_square_sum / self._map_count - mean * mean).clamp(min=0)
        self.model.set_map_statistics(mean.float(), variance.sqrt().float())
        self._map_sum = self._map_square_sum = None
        self._map_count = 0

    def on_train_epoch_start(self) -> None:
        self._map_sum = self._map_square_sum = None
        self._map_count = 0

    def on_validation_epoch_start(self) -> None:
        # Lightning validates at the end of a training epoch, before on_train_epoch_end: commit first so
        # the post-processor's statistics see the same maps as inference will
        self._commit_map_statistics()

    def on_train_epoch_end(self) -> None:
        self._commit_map_statistics()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Scores and maps for the post-processor's threshold and normalisation statistics."""
        del args, kwargs
        self._check_images(batch.image)
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())
