"""Dfkdm: deep-feature kernel density model (DfKDM), with a LAKE-style autoencoder feature source.

``feature_source="backbone"`` is fit-only, like anomalib's Dfkde: one pass over the normal training images
collects pooled backbone features, then the density is fitted. ``feature_source="autoencoder"`` trains a
convolutional autoencoder for ``max_epochs`` epochs in the same ``anomalib train`` run, then passes once more
over the training images with the trained network to collect LAKE features (latent code plus
reconstruction errors) and fits the density on them.

When the density is fitted: Lightning runs validation inside the training epoch, before
``on_train_epoch_end``, so the fit happens in ``on_validation_start`` (whenever the network changed since the
last fit) and, for runs without validation, in ``on_train_end``. A checkpoint stores the fitted density as
buffers, so a reloaded model never refits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
from torchvision.transforms.v2 import InterpolationMode

from anomalib_ext.models.components import (
    DEFAULT_BACKBONE,
    DEFAULT_POOLED_LAYERS,
    ExtModelMixin,
    ImageSize,
    InputNormalization,
    ReconstructionLoss,
    as_pair,
    gather_rows,
    image_metrics_evaluator,
)
from anomalib_ext.models.components.kde import BandwidthRule, DensityKind, ScalingMethod

from .torch_model import DfkdmModel, FeatureSource

logger = logging.getLogger(__name__)

# the default of ``input_normalization`` (one place to flip it)
INPUT_NORMALIZATION: InputNormalization = "backbone"


class Dfkdm(ExtModelMixin, AnomalibModule):
    """Deep-feature kernel density model.

    Args:
        feature_source: ``backbone`` (pooled pretrained features, image-level) or ``autoencoder`` (LAKE:
            latent code + reconstruction errors; anomaly map = reconstruction residual).
        backbone: timm architecture with offline weights (``tf_efficientnet_lite0/1/2``).
        layers: backbone layers whose pooled activations are concatenated.
        input_normalization: how the torch model standardises the [0, 1] images for the backbone: ``backbone``
            (the mean/std its pretrained weights expect, timm's ``pretrained_cfg``) or ``imagenet``.
        pre_trained: load the pretrained backbone weights.
        image_size: input size after the default pre-processor (and the autoencoder's size). The default
            pre-processor only resizes: antialiased for the backbone, nearest neighbour for the autoencoder (keeps
            thin defects sharp); the autoencoder sees raw [0, 1] images (its output is a sigmoid, and mean/std
            normalisation of near-constant images blows noise up, DfKDM tips).
        in_channels, latent_dim, base_channels, num_downsamples, variational: the autoencoder.
        learning_rate, weight_decay: Adam settings for the autoencoder.
        l2_weight, ssim_weight, beta: reconstruction loss weights (``beta`` for the VAE's KL term).
        density: ``kde`` or ``gaussian``.
        bandwidth: KDE bandwidth rule ``scott``, ``silverman``, ``loo`` (max leave-one-out likelihood) or a
            positive factor.
        n_components: PCA components: a count, a fraction of the variance in (0, 1), or ``<= 0`` (no reduction).
        residual: add the log density of the residual outside the kept components (isotropic Gaussian with
            probabilistic PCA's variance): with ``density="gaussian"`` the score is the probabilistic-PCA negative
            log likelihood, in-subspace Mahalanobis distance + residual / sigma^2.
        feature_scaling: ``standardize``, ``scale``, ``norm`` or ``none``, before PCA.
        max_training_points: cap on the points the density is fitted on (random, seeded sample).
        calibrate: scores in [0, 1] instead of the raw negative log density.
        map_sigma: smoothing of the residual map in pixels (autoencoder mode).
        check_data: read every file of the datamodule before fitting and stop with exit status 2 naming the first
            bad one (``False`` skips the check).
        pre_processor, post_processor, evaluator, visualizer: anomalib components or flags.
    """

    def quantized_modules(self) -> tuple[str, ...]:
        """INT8_PTQ quantises the feature network only: the backbone, or the LAKE autoencoder. Pooling, scaling,
        PCA, the density and the calibration stay in float (README, "Export and INT8")."""
        return ("model.feature_extractor",) if self.feature_source == "backbone" else ("model.autoencoder",)

    def __init__(
        self,
        feature_source: FeatureSource = "backbone",
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_POOLED_LAYERS,
        input_normalization: InputNormalization = INPUT_NORMALIZATION,
        pre_trained: bool = True,
        image_size: ImageSize = 256,
        in_channels: int = 3,
        latent_dim: int = 32,
        base_channels: int = 32,
        num_downsamples: int = 4,
        variational: bool = False,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        l2_weight: float = 1.0,
        ssim_weight: float = 1.0,
        beta: float = 1e-3,
        density: DensityKind = "gaussian",
        bandwidth: BandwidthRule | float = "loo",
        n_components: int | float = 0.97,
        residual: bool = True,
        feature_scaling: ScalingMethod = "standardize",
        max_training_points: int = 2000,
        calibrate: bool = False,
        map_sigma: float = 4.0,
        check_data: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if pre_processor is True and feature_source == "autoencoder":
            pre_processor = self.configure_pre_processor(image_size, InterpolationMode.NEAREST)
        super().__init__(image_size, check_data, pre_processor, post_processor, evaluator, visualizer)
        self.feature_source = feature_source
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.model: DfkdmModel = DfkdmModel(
            feature_source=feature_source,
            backbone=backbone,
            layers=layers,
            input_normalization=input_normalization,
            pre_trained=pre_trained,
            image_size=as_pair(image_size),
            in_channels=in_channels,
            latent_dim=latent_dim,
            base_channels=base_channels,
            num_downsamples=num_downsamples,
            variational=variational,
            density=density,
            bandwidth=bandwidth,
            n_components=n_components,
            residual=residual,
            feature_scaling=feature_scaling,
            max_training_points=max_training_points,
            calibrate=calibrate,
            map_sigma=map_sigma,
        )
        self.loss = (
            ReconstructionLoss(
                l2_weight=l2_weight, ssim_weight=ssim_weight, beta=beta, ssim_window_size=11, ssim_sigma=1.5
            )
            if feature_source == "autoencoder"
            else None
        )
        self.register_buffer("_is_fitted", torch.tensor([False]))
        self._is_fitted: torch.Tensor
        self._collected_features: list[torch.Tensor] = []
        self._collected_ids: list[str] | None = []  # image paths of the collected features (None: some had none)
        self._fitted_at_step = -1

    # ------------------------------------------------------------------------------------------ components
    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image AUROC and F1 (plus pixel AUROC when there is a map, i.e. autoencoder mode)."""
        return image_metrics_evaluator()

    # ------------------------------------------------------------------------------------------- training
    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        """Adam on the autoencoder; nothing to optimise in backbone mode."""
        if self.model.autoencoder is None:
            return None
        return torch.optim.Adam(
            self.model.autoencoder.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )

    def on_train_epoch_start(self) -> None:
        """Each epoch sees the whole training set again: keep only this epoch's backbone features."""
        self._collected_features, self._collected_ids = [], []

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Backbone: collect features. Autoencoder: one reconstruction-loss step."""
        del args, kwargs
        if self.loss is None:
            with torch.no_grad():
                self._collected_features.append(self.model.backbone_features(batch.image).cpu())
            self._collected_ids = self._extend_ids(self._collected_ids, batch)
            self._is_fitted = torch.tensor([False], device=self.device)
            return torch.tensor(0.0, requires_grad=True, device=self.device)  # Lightning wants a loss
        assert self.model.autoencoder is not None
        terms = self.loss(batch.image, self.model.autoencoder(batch.image))
        self.log_dict({f"train_{name}": value for name, value in terms.items()}, prog_bar=True, on_epoch=True)
        return terms["loss"]

    # ------------------------------------------------------------------------------------------ density fit
    def _needs_fit(self) -> bool:
        if self.loss is None:
            return bool(self._collected_features) or not bool(self._is_fitted)
        return not bool(self._is_fitted) or self._fitted_at_step != self.global_step

    @staticmethod
    def _extend_ids(ids: list[str] | None, batch: Batch) -> list[str] | None:
        """The image paths so far plus the batch's (``None`` once a batch comes without paths)."""
        if ids is None or batch.image_path is None:
            return None
        return [*ids, *(str(path) for path in batch.image_path)]

    def _lake_training_features(self) -> tuple[torch.Tensor, list[str] | None]:
        """One pass over the training images with the trained autoencoder (eval mode, no gradients); under DDP
        over this rank's shard (``fit`` gathers the shards)."""
        trainer = self._trainer
        if trainer is None or trainer.train_dataloader is None:
            msg = "Dfkdm (autoencoder) can only fit its density inside a Lightning fit (no training dataloader)"
            raise RuntimeError(msg)
        was_training = self.model.training
        self.model.eval()
        features = []
        ids: list[str] | None = []
        transform = getattr(self.pre_processor, "transform", None)
        with torch.no_grad():
            for batch in trainer.train_dataloader:
                images = batch.image.to(self.device)
                if transform is not None:
                    images = transform(images)
                features.append(self.model.extract_features(images).cpu())
                ids = self._extend_ids(ids, batch)
        self.model.train(was_training)
        return torch.cat(features), ids

    def fit(self) -> None:
        """Fit the density on the normal training features (capped sample).

        The features are sorted by image path (each image once) before the seeded sample, so the fit depends
        neither on the loader's order nor on the number of DDP ranks: every rank gathers all ranks' features and
        fits the same density.
        """
        if self.loss is None:
            if not self._collected_features:
                msg = "Dfkdm has no training features to fit: run training (engine.fit) first"
                raise RuntimeError(msg)
            features, ids = torch.cat(self._collected_features), self._collected_ids
            self._collected_features, self._collected_ids = [], []
        else:
            features, ids = self._lake_training_features()
        features, _ = gather_rows(features, ids, self.device)
        used = self.model.density.fit(features.to(self.device))
        logger.info("Dfkdm: density fitted on %d of %d training feature vectors", used, len(features))
        self._is_fitted = torch.tensor([True], device=self.device)
        self._fitted_at_step = self.global_step

    def on_validation_start(self) -> None:
        """Validation runs inside the training epoch: fit here whenever training changed something."""
        if self._needs_fit():
            self.fit()

    def on_train_end(self) -> None:
        """Runs without validation still end with a fitted density."""
        if self._needs_fit():
            self.fit()

    def _require_fitted(self) -> None:
        if not bool(self._is_fitted):
            msg = "Dfkdm is not fitted: train it (engine.fit / anomalib train) or load a trained checkpoint"
            raise RuntimeError(msg)

    def on_test_start(self) -> None:
        self._require_fitted()

    def on_predict_start(self) -> None:
        self._require_fitted()

    # ------------------------------------------------------------------------------------------- settings
    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Backbone: one pass, no gradients. Autoencoder: normal training; both skip the sanity check."""
        if self.feature_source == "backbone":
            return {"gradient_clip_val": 0, "max_epochs": 1, "num_sanity_val_steps": 0}
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS
