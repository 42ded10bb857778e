"""Fused: the recommended default. TileOutlier's tile-outlier map and Dfkdm's global density from one backbone pass,
each standardised on held-out normal scores and fused into one image score.

Fit-only, like its two halves: one pass over the normal training images collects tile embeddings (a capped
reservoir, as TileOutlier) and pooled features (as Dfkdm), then the torch model's ``fit`` cross-fits both halves for
held-out normal scores, standardises each on them and fits both on every image. Under DDP every rank first merges
all ranks' data, so N devices fit the same model as one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

import torch
from anomalib.data import Batch, InferenceBatch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule, MemoryBankMixin
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_ext.models.components import (
    DEFAULT_BACKBONE,
    DEFAULT_LAYERS,
    ExtModelMixin,
    FitOnlyHooks,
    ImageSize,
    ImageTiling,
    InputNormalization,
    gather_reservoir,
    gather_rows,
    with_image_paths,
)
from anomalib_ext.models.components.sampling import ReservoirSampler
from anomalib_ext.models.components.tile_scoring import extend_bank_held_out

from .torch_model import FusedModel, Fusion

logger = logging.getLogger(__name__)

# the global half reads the tile half's trunk (it ends at blocks.4): one pass costs no more than TileOutlier's
DENSITY_LAYERS = ("blocks.2", "blocks.4")

# tile embeddings kept while fitting (a uniform reservoir over images), as TileOutlier's ``max_fit_tiles``
MAX_FIT_TILES = 400_000


class Fused(FitOnlyHooks, ExtModelMixin, MemoryBankMixin, AnomalibModule):
    """Tile outliers and a global feature density on one backbone pass, standardised and fused.

    Args:
        image_size: input size after the default pre-processor; fixes the tile grid (and the export size).
        backbone: the offline timm backbone, run once per image for both halves.
        tile_layers: layers whose feature maps are averaged over each tile (the tile-outlier half).
        density_layers: layers whose activations' mean and spread over the image make the density's feature vector
            (a layer deeper than ``tile_layers``' deepest lengthens the backbone pass).
        tile_size, stride: square tiles of ``tile_size`` pixels every ``stride`` pixels (at the pre-processed size).
        max_bank_tiles: cap on the tile bank (a k-center coreset per grid position, as TileOutlier's
            ``memory_bank.max_tiles``).
        map_sigma: Gaussian smoothing of the painted tile map in pixels (0 = none).
        fusion: ``mean`` of the two standardised scores (evidence from both adds up) or their ``max`` (either one
            alone decides).
        input_normalization: how the [0, 1] images are standardised for the backbone: ``backbone`` (the
            mean/std its pretrained weights expect), ``imagenet``, ``per_image`` (each image's own, which makes
            the features hold under brightness/contrast changes; docs/lighting.md) or ``flat_field`` (first divided
            by its own smooth illumination: also under a light falling off across it).
        image_tiling: ``ImageTiling`` or a mapping of its keys (``tile_size``, ``stride``, ``tile_batch``): run the
            backbone on tiles of a large ``image_size`` and stitch its features (configs/fused/mvtec_large.yaml).
        check_data: read every file of the datamodule before fitting and stop with exit status 2 naming the first
            bad one (``False`` skips the check).
        pre_processor, post_processor, evaluator, visualizer: anomalib components or flags.
    """

    # INT8_PTQ quantises the backbone and the tile search's similarity product with the bank (as TileOutlier's);
    # pooling, the max over the bank, the density and the fusion stay in float
    int8_modules: ClassVar[tuple[str, ...]] = ("model.feature_extractor", "model.tiles.bank_similarity")
    # 0.11.0 changed what the density's buffers describe (means and spreads of blocks.2/4, not means of blocks.2/4/6)
    oldest_readable_release: ClassVar[tuple[int, int]] = (0, 11)

    def __init__(
        self,
        image_size: ImageSize = 256,
        backbone: str = DEFAULT_BACKBONE,
        tile_layers: Sequence[str] = DEFAULT_LAYERS,
        density_layers: Sequence[str] = DENSITY_LAYERS,
        tile_size: int = 32,
        stride: int = 8,
        max_bank_tiles: int = 13_456,
        map_sigma: float = 4.0,
        fusion: Fusion = "mean",
        input_normalization: InputNormalization = "backbone",
        image_tiling: ImageTiling = ImageTiling(),  # noqa: B008  (frozen: a shared default is safe)
        check_data: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(image_size, check_data, pre_processor, post_processor, evaluator, visualizer)
        self.model: FusedModel = FusedModel(
            image_size=self.image_size,
            backbone=backbone,
            tile_layers=tile_layers,
            density_layers=density_layers,
            tile_size=tile_size,
            stride=stride,
            max_bank_tiles=max_bank_tiles,
            map_sigma=map_sigma,
            fusion=fusion,
            input_normalization=input_normalization,
            image_tiling=ImageTiling.coerce(image_tiling),
        )
        self._reset_collected()

    def _reset_collected(self) -> None:
        self._tiles = ReservoirSampler(max(1, MAX_FIT_TILES // self.model.tiles.grid.num_tiles))
        self._features: list[torch.Tensor] = []
        self._image_paths: list[str] | None = []  # of the collected features (None: some batch had none)

    # ------------------------------------------------------------------------------------------- training
    def on_train_epoch_start(self) -> None:
        """Each epoch sees the same images: collect them once per epoch."""
        self._reset_collected()

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One backbone pass: tile embeddings into the reservoir, pooled features into the list."""
        del args, kwargs
        with torch.no_grad():
            tile_embeddings, global_features = self.model.extract(batch.image)
        # ids: DDP's padding repeats of an image count once when the ranks merge
        self._tiles.add(tile_embeddings.cpu(), ids=batch.image_path)
        self._features.append(global_features.cpu())
        self._image_paths = with_image_paths(self._image_paths, batch.image_path)
        return torch.tensor(0.0, requires_grad=True, device=self.device)  # Lightning wants a loss

    def fit(self) -> None:
        """Merge every rank's collected data, then fit the torch model (called by ``MemoryBankMixin``)."""
        if not self._features:
            msg = "Fused has no training features to fit: run training (engine.fit) first"
            raise RuntimeError(msg)
        merged = gather_reservoir(self._tiles, self.device)
        assert merged is not None  # the local reservoir is never None
        features, _ = gather_rows(torch.cat(self._features), self._image_paths, self.device)
        tile_embeddings = merged.samples().to(self.device)
        logger.info(
            "Fused: fitting on %d images (tiles of %d images x %d)",
            len(features),
            len(tile_embeddings),
            self.model.tiles.grid.num_tiles,
        )
        self.model.fit(tile_embeddings, features.to(self.device))
        self._reset_collected()

    def extend_bank(self, images: torch.Tensor) -> InferenceBatch:
        """Add pre-processed normal ``images`` of a new condition (a light, a shadow) to the tile half's bank, no
        gradient step; returns their leave-one-out outputs for the thresholds (``extend_bank_held_out``).
        ``anomalib-ext recalibrate --extend-bank`` calls it. The density half and the two standardisers stay as
        fitted: a moment-based density keeps no training features to refit on, and ten images would not move it."""
        model = self.model.eval()
        with torch.no_grad():
            tile_embeddings, _ = model.extract(images)
        held_out = extend_bank_held_out(model.tiles, tile_embeddings, images, model)
        logger.info("Fused: the tile bank holds %d tiles (%d new images added)", model.tiles.bank_tiles, len(images))
        return held_out
