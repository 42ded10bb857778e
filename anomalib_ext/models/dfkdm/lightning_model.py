"""Dfkdm (deep-feature kernel density model) and DfkdmLake (its LAKE autoencoder variant).

``Dfkdm`` is fit-only, like anomalib's Dfkde: one pass over the normal training images collects pooled backbone
features, then the torch model fits its density (``MemoryBankMixin``: the fit happens before validation, or at
the end of the epoch for runs without validation).

``DfkdmLake`` trains a convolutional autoencoder for ``max_epochs`` epochs in the same ``anomalib train`` run,
then passes once more over the training images with the trained network to collect LAKE features (latent code
plus reconstruction errors) and fits the density on them. Lightning runs validation inside the training epoch,
before ``on_train_epoch_end``, so that fit happens in ``on_validation_start`` (whenever the network changed since
the last fit) and, for runs without validation, in ``on_train_end``.

Both merge the ranks' features before fitting (``gather_rows``: sorted by image path, each image once), so N DDP
devices fit the same density as one. A checkpoint stores the fitted density as buffers: a reloaded model never
refits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule, MemoryBankMixin
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import InterpolationMode

from anomalib_ext.models.components import (
    DEFAULT_BACKBONE,
    DEFAULT_POOLED_LAYERS,
    ExtModelMixin,
    FitOnlyHooks,
    ImageSize,
    ImageTiling,
    InputNormalization,
    ReconstructionLoss,
    as_pair,
    gather_rows,
    image_metrics_evaluator,
    with_image_paths,
)
from anomalib_ext.models.components.training_budget import DEFAULT_MIN_STEPS, ensure_min_steps

from .torch_model import DensitySettings, DfkdmModel, LakeModel

logger = logging.getLogger(__name__)

# DfkdmLake's density: a KDE on the whole feature vector, no PCA (so no residual). The latent code is short, and on
# the small data sets LAKE trains on PCA would drop informative latent directions.
LAKE_DENSITY = DensitySettings(kind="kde", n_components=0, residual=False)


def _fit_across_ranks(module: AnomalibModule, features: torch.Tensor, ids: list[str] | None) -> None:
    """Merge every rank's features (sorted by image path, each image once) and fit the torch model's density.

    Sorting before the model's seeded sample makes the fit independent of the loader's order and of the number
    of DDP ranks: every rank fits the same density.
    """
    features, _ = gather_rows(features, ids, module.device)
    used = module.model.fit(features.to(module.device))
    logger.info("%s: density fitted on %d of %d training feature vectors", type(module).__name__, used, len(features))


class _FittedDensityHooks:
    """What both classes do around a fitted density: refuse to score unfitted, image metrics, one-class."""

    _is_fitted: torch.Tensor

    def _require_fitted(self) -> None:
        if not bool(self._is_fitted):
            name = type(self).__name__
            msg = f"{name} is not fitted: train it (engine.fit / anomalib train) or load a trained checkpoint"
            raise RuntimeError(msg)

    def on_test_start(self) -> None:
        self._require_fitted()

    def on_predict_start(self) -> None:
        self._require_fitted()

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image AUROC and F1, and pixel AUROC where the model has a map (DfkdmLake's residual)."""
        return image_metrics_evaluator()

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS


class Dfkdm(FitOnlyHooks, _FittedDensityHooks, ExtModelMixin, MemoryBankMixin, AnomalibModule):
    """Deep-feature kernel density model on pooled pretrained-backbone features (image-level, fit-only).

    Args:
        backbone: timm architecture with offline weights (``tf_efficientnet_lite0/1/2``).
        layers: backbone layers whose global-average-pooled activations are concatenated.
        input_normalization: how the torch model standardises the [0, 1] images for the backbone: ``backbone``
            (the mean/std its pretrained weights expect, timm's ``pretrained_cfg``), ``imagenet``, ``per_image``
            (each image's own per-channel mean/std: holds under brightness/contrast changes, docs/lighting.md) or
            ``flat_field`` (first divided by its own smooth illumination: also under a light falling off across it).
        pre_trained: load the pretrained backbone weights.
        density: the density of the normal features: a ``DensitySettings``, or a mapping of some of its fields
            (``kind``, ``bandwidth``, ``n_components``, ``residual``, ``feature_scaling``,
            ``max_training_points``; each documented in ``DensitySettings``), the others keeping their defaults.
            Default: probabilistic PCA (``kind: gaussian``, 97 % of the variance, ``residual: true``).
        calibrate: report ``sigmoid((nll - median) / spread)`` in [0, 1] (median and spread of the normal fit
            points' scores) instead of the raw negative log density. Monotone: AUROC and validation thresholds are
            unaffected.
        image_size: resize target of the default pre-processor (antialiased, no normalisation: the torch model
            normalises for the backbone, so the export contains it).
        image_tiling: ``ImageTiling`` or a mapping of its keys (``tile_size``, ``stride``, ``tile_batch``): run the
            backbone on tiles of a large ``image_size`` and pool each tile: the density is fitted on every tile of
            every training image and an image scores its worst tile (a defect of a few pixels moves one tile's
            vector, where the whole image's average drowns it).
        check_data: read every file of the datamodule before fitting and stop with exit status 2 naming the first
            bad one (``False`` skips the check).
        pre_processor, post_processor, evaluator, visualizer: anomalib components or flags.
    """

    # INT8_PTQ quantises the backbone only: pooling, scaling, PCA, the density and the calibration stay in float
    int8_modules: ClassVar[tuple[str, ...]] = ("model.feature_extractor",)

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_POOLED_LAYERS,
        input_normalization: InputNormalization = "backbone",
        pre_trained: bool = True,
        density: DensitySettings = DensitySettings(),  # noqa: B008  (frozen, so sharing the default is safe)
        calibrate: bool = False,
        image_size: ImageSize = 256,
        image_tiling: ImageTiling = ImageTiling(),  # noqa: B008
        check_data: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(image_size, check_data, pre_processor, post_processor, evaluator, visualizer)
        self.model: DfkdmModel = DfkdmModel(
            backbone=backbone,
            layers=layers,
            input_normalization=input_normalization,
            pre_trained=pre_trained,
            density=DensitySettings.coerce(density),
            calibrate=calibrate,
            image_tiling=ImageTiling.coerce(image_tiling),
            image_size=self.image_size,
        )
        self._features: list[torch.Tensor] = []
        self._image_paths: list[str] | None = []  # of the collected features (None: some batch had none)

    def on_train_epoch_start(self) -> None:
        """Each epoch sees the whole training set again: keep only this epoch's features, fit them again."""
        self._features, self._image_paths = [], []
        self._is_fitted = torch.tensor([False], device=self.device)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Collect the pooled backbone features of the normal training images."""
        del args, kwargs
        with torch.no_grad():
            self._features.append(self.model.extract_features(batch.image).cpu())
        self._image_paths = with_image_paths(self._image_paths, batch.image_path)
        return torch.tensor(0.0, requires_grad=True, device=self.device)  # Lightning wants a loss

    def fit(self) -> None:
        """Fit the torch model's density on the collected features of every rank (called by ``MemoryBankMixin``)."""
        if not self._features:
            msg = "Dfkdm has no training features to fit: run training (engine.fit) first"
            raise RuntimeError(msg)
        features, paths = torch.cat(self._features), self._image_paths
        self._features, self._image_paths = [], []
        _fit_across_ranks(self, features, paths)


class DfkdmLake(_FittedDensityHooks, ExtModelMixin, AnomalibModule):
    """LAKE: density of a trained autoencoder's latent code plus its reconstruction errors; map = the residual.

    Args:
        latent_dim: size of the autoencoder's bottleneck vector.
        base_channels: channels after the first downsampling (doubled at each further stage, capped at 8x).
        num_downsamples: stride-2 stages; ``image_size`` must be divisible by ``2 ** num_downsamples``.
        learning_rate: Adam's learning rate for the autoencoder.
        l2_weight, ssim_weight: weights of the reconstruction loss ``l2_weight * MSE + ssim_weight * (1 - SSIM)``.
        density: the density of the LAKE features, as ``Dfkdm``'s ``density`` (fields in ``DensitySettings``) with
            other defaults: a KDE (leave-one-out bandwidth) without PCA (``kind: kde,
            n_components: 0, residual: false``). PCA applies to the latent code only; the reconstruction-error
            features bypass it.
        calibrate: scores in [0, 1], as ``Dfkdm``'s ``calibrate``.
        map_sigma: standard deviation (pixels) of the Gaussian that smooths the residual map; 0 disables.
        image_size: the autoencoder's input size; the default pre-processor only resizes, by nearest neighbour (keeps
            thin defects sharp), and the autoencoder sees raw [0, 1] images (its output is a sigmoid, and mean/std
            normalisation of near-constant images blows noise up, DfKDM tips).
        check_data, pre_processor, post_processor, evaluator, visualizer: as ``Dfkdm``'s.
    """

    resize_interpolation: ClassVar[InterpolationMode] = InterpolationMode.NEAREST
    # optimiser steps a fit takes at least (a few dozen images make one batch an epoch): bottle at 10 normals,
    # 4 steps: pixel AUROC 0.20-0.22; 50 steps: 0.75 (0.74 on all 168 normals)
    min_steps: ClassVar[int] = DEFAULT_MIN_STEPS
    # INT8_PTQ quantises the autoencoder only: features, residual map, PCA, density and calibration stay in float
    int8_modules: ClassVar[tuple[str, ...]] = ("model.autoencoder",)

    def __init__(
        self,
        latent_dim: int = 32,
        base_channels: int = 32,
        num_downsamples: int = 4,
        learning_rate: float = 1e-3,
        l2_weight: float = 1.0,
        ssim_weight: float = 1.0,
        density: DensitySettings = LAKE_DENSITY,
        calibrate: bool = False,
        map_sigma: float = 4.0,
        image_size: ImageSize = 128,
        check_data: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(image_size, check_data, pre_processor, post_processor, evaluator, visualizer)
        self.learning_rate = learning_rate
        self.model: LakeModel = LakeModel(
            image_size=as_pair(image_size),
            latent_dim=latent_dim,
            base_channels=base_channels,
            num_downsamples=num_downsamples,
            density=DensitySettings.coerce(density, defaults=LAKE_DENSITY),
            calibrate=calibrate,
            map_sigma=map_sigma,
        )
        self.loss = ReconstructionLoss(
            l2_weight=l2_weight, ssim_weight=ssim_weight, beta=0.0, ssim_window_size=11, ssim_sigma=1.5
        )
        self.register_buffer("_is_fitted", torch.tensor([False]))
        self._is_fitted: torch.Tensor
        self._fitted_at_step = -1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.autoencoder.parameters(), lr=self.learning_rate)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One reconstruction-loss step of the autoencoder."""
        del args, kwargs
        terms = self.loss(batch.image, self.model.autoencoder(batch.image))
        self.log_dict({f"train_{name}": value for name, value in terms.items()}, prog_bar=True, on_epoch=True)
        return terms["loss"]

    def _needs_fit(self) -> bool:
        return not bool(self._is_fitted) or self._fitted_at_step != self.global_step

    def fit(self) -> None:
        """One pass over this rank's training images with the trained network, then fit on every rank's features."""
        trainer = self._trainer
        if trainer is None or trainer.train_dataloader is None:
            msg = "DfkdmLake can only fit its density inside a Lightning fit (no training dataloader)"
            raise RuntimeError(msg)
        transform = getattr(self.pre_processor, "transform", None)
        features, paths = [], []
        for batch in trainer.train_dataloader:
            images = batch.image.to(self.device)
            features.append(self.model.extract_features(transform(images) if transform is not None else images).cpu())
            paths = with_image_paths(paths, batch.image_path)
        _fit_across_ranks(self, torch.cat(features), paths)
        self._is_fitted = torch.tensor([True], device=self.device)
        self._fitted_at_step = self.global_step

    def on_fit_start(self) -> None:
        """Validate once, after the last epoch (Lightning's default validates after every epoch).

        Each validation first refits the density on a pass over every training image, and the network of an earlier
        epoch is not the one the run keeps: on dice (550 training, 1,267 validation images) those passes took longer
        than the training itself. A run that sets ``check_val_every_n_epoch`` above 1 keeps its own choice.
        """
        trainer = self.trainer
        if trainer.check_val_every_n_epoch == 1 and trainer.max_epochs is not None and trainer.max_epochs > 1:
            trainer.check_val_every_n_epoch = trainer.max_epochs

    def on_train_start(self) -> None:
        """Few images make few optimiser steps: train at least ``min_steps``, still validating once, at the end."""
        epochs = self.trainer.max_epochs
        new_epochs = ensure_min_steps(self.trainer, "DfkdmLake", self.min_steps)
        if new_epochs is not None and self.trainer.check_val_every_n_epoch in (1, epochs):
            self.trainer.check_val_every_n_epoch = new_epochs

    def on_validation_start(self) -> None:
        """Validation runs inside the training epoch: fit here whenever training changed the network."""
        if self._needs_fit():
            self.fit()

    def on_train_end(self) -> None:
        """Runs without validation still end with a fitted density."""
        if self._needs_fit():
            self.fit()

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Normal training; no sanity check (the density is not fitted before the first epoch)."""
        return {"num_sanity_val_steps": 0}
