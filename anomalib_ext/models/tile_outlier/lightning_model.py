"""TileOutlier: segment-level anomaly detection by tile outliers (fastdup-style nearest-neighbour scores).

Fit-only, like PatchCore: one pass over the normal training images collects tile embeddings into a capped
reservoir, then the torch model's ``fit`` turns a k-center coreset of them into the memory bank.
``backend="fastdup"`` embeds tiles with fastdup's bundled model instead (optional, non-commercial licence, not
exportable).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

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
)
from anomalib_ext.models.components.sampling import ReservoirSampler
from anomalib_ext.models.components.settings import Settings
from anomalib_ext.models.components.tile_scoring import extend_bank_held_out

from .torch_model import TileOutlierModel

logger = logging.getLogger(__name__)

Backend = Literal["torch", "fastdup"]
# the default of ``input_normalization`` (one place to flip it)
INPUT_NORMALIZATION: InputNormalization = "backbone"


@dataclass(frozen=True)
class TilingSettings(Settings):
    """The tile grid (fixed by ``image_size``) and how each tile is embedded. Give ``num_parts`` or ``tile_size``.

    Args:
        num_parts: ``N`` for an ``N x N`` grid of non-overlapping tiles (the origin's segments); set ``tile_size``
            and ``stride`` to ``null`` with it.
        tile_size: side of square tiles, pixels at the pre-processed size.
        stride: step between tiles (``tile_size`` when ``null``); ``stride < tile_size`` overlaps tiles, which
            sharpens the map.
        embed: ``pool`` (backbone once per image, features averaged over each tile) or ``crop`` (each tile
            resampled to ``crop_size`` and embedded on its own).
        crop_size: crop side for ``embed: crop`` (``null``: the largest tile side).
    """

    num_parts: int | None = None
    tile_size: int | None = 32
    stride: int | None = 8
    embed: Literal["pool", "crop"] = "pool"
    crop_size: int | None = None


@dataclass(frozen=True)
class SearchSettings(Settings):
    """Which bank tiles a tile is compared with, and how many make its score.

    Args:
        position_aware: compare a tile only with bank tiles at the same or neighbouring grid positions.
        neighborhood: radius, in grid positions, of those neighbouring positions.
        num_neighbors: ``k`` nearest bank tiles averaged in the score ``1 - cosine similarity``.
    """

    position_aware: bool = True
    neighborhood: int = 1
    num_neighbors: int = 1


@dataclass(frozen=True)
class MemoryBankSettings(Settings):
    """Caps that keep fit memory and search cost bounded whatever the training set's size.

    Args:
        max_tiles: cap on the bank's tiles (over all positions), reached with a greedy k-center coreset.
        max_fit_tiles: cap on the tile embeddings kept while fitting (a uniform reservoir over images).
    """

    max_tiles: int = 13_456
    max_fit_tiles: int = 400_000


class TileOutlier(FitOnlyHooks, ExtModelMixin, MemoryBankMixin, AnomalibModule):
    """Tile-outlier anomaly detection.

    Args:
        image_size: input size after the default pre-processor; fixes the tile grid (and the export size).
        tiling: ``TilingSettings`` or a mapping of its keys (``num_parts``, ``tile_size``, ``stride``, ``embed``,
            ``crop_size``).
        backbone, layers, pre_trained: the offline timm backbone and the layers of the tile embedding.
        input_normalization: how the torch model standardises the [0, 1] images for the backbone: ``backbone``
            (the mean/std its pretrained weights expect, timm's ``pretrained_cfg``), ``imagenet``, ``per_image``
            (each image's own per-channel mean/std: holds under brightness/contrast changes, docs/lighting.md) or
            ``flat_field`` (first divided by its own smooth illumination: also under a light falling off across it).
        search: ``SearchSettings`` or a mapping of its keys (``position_aware``, ``neighborhood``,
            ``num_neighbors``).
        memory_bank: ``MemoryBankSettings`` or a mapping of its keys (``max_tiles``, ``max_fit_tiles``).
        map_sigma: Gaussian smoothing of the painted map in pixels (0 = none).
        image_tiling: ``ImageTiling`` or a mapping of its keys (``tile_size``, ``stride``, ``tile_batch``): run the
            backbone on tiles of a large ``image_size`` and stitch its features (configs/tile_outlier/mvtec_large.yaml).
        backend: ``torch`` (exportable) or ``fastdup`` (fastdup's model embeds the tiles, through PNG files in a
            temporary directory; optional extra).
        check_data: read every file of the datamodule before fitting and stop with exit status 2 naming the first
            bad one (``False`` skips the check).
        pre_processor, post_processor, evaluator, visualizer: anomalib components or flags.
    """

    # INT8_PTQ quantises the backbone convolutions and the search's similarity product with the bank
    # (components.tile_scoring.BankSimilarity); tile pooling, the top-k, painting and blurring the map stay in float
    # (README, "Export and INT8")
    int8_modules: ClassVar[tuple[str, ...]] = ("model.feature_extractor", "model.bank_similarity")

    def __init__(
        self,
        image_size: ImageSize = 256,
        tiling: TilingSettings = TilingSettings(),  # noqa: B008  (frozen: a shared default is safe)
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_LAYERS,
        input_normalization: InputNormalization = INPUT_NORMALIZATION,
        pre_trained: bool = True,
        search: SearchSettings = SearchSettings(),  # noqa: B008
        memory_bank: MemoryBankSettings = MemoryBankSettings(),  # noqa: B008
        map_sigma: float = 4.0,
        image_tiling: ImageTiling = ImageTiling(),  # noqa: B008
        backend: Backend = "torch",
        check_data: bool = True,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if backend not in ("torch", "fastdup"):
            msg = f"backend must be 'torch' or 'fastdup', got '{backend}'"
            raise ValueError(msg)
        grid, neighbours, bank = (
            TilingSettings.coerce(tiling),
            SearchSettings.coerce(search),
            MemoryBankSettings.coerce(memory_bank),
        )
        if not isinstance(bank.max_fit_tiles, int) or bank.max_fit_tiles <= 0:
            msg = f"max_fit_tiles must be a positive integer, got {bank.max_fit_tiles!r}"
            raise ValueError(msg)
        super().__init__(image_size, check_data, pre_processor, post_processor, evaluator, visualizer)
        self.backend = backend
        self.model: TileOutlierModel = TileOutlierModel(
            image_size=self.image_size,
            num_parts=grid.num_parts,
            tile_size=grid.tile_size,
            stride=grid.stride,
            embed=grid.embed,
            backbone=backbone,
            layers=layers,
            input_normalization=input_normalization,
            # the fastdup backend only borrows the grid, bank and scoring: no backbone weights needed
            pre_trained=pre_trained and backend == "torch",
            crop_size=grid.crop_size,
            position_aware=neighbours.position_aware,
            neighborhood=neighbours.neighborhood,
            num_neighbors=neighbours.num_neighbors,
            max_bank_size=bank.max_tiles,
            map_sigma=map_sigma,
            image_tiling=ImageTiling.coerce(image_tiling),
        )
        self.max_fit_tiles = bank.max_fit_tiles
        self.max_tiles = bank.max_tiles
        self._reservoir = self._new_reservoir()
        self._fastdup = None
        if backend == "fastdup":
            from .fastdup_backend import FastdupTileEmbedder  # optional extra: imported only when asked for

            self._fastdup = FastdupTileEmbedder(self.model.grid)
            self.model.external_embedder = self._fastdup.embed  # the pre-processor leaves images in [0, 1]

    def _new_reservoir(self) -> ReservoirSampler:
        return ReservoirSampler(max(1, self.max_fit_tiles // self.model.grid.num_tiles))

    # ------------------------------------------------------------------------------------------- training
    def on_train_epoch_start(self) -> None:
        """Each epoch sees the same images: collect them once per epoch."""
        self._reservoir = self._new_reservoir()

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Collect the tile embeddings of normal images into the capped reservoir."""
        del args, kwargs
        with torch.no_grad():  # ids: DDP's padding repeats of an image count once when the ranks merge
            self._reservoir.add(self.model.embed(batch.image).cpu(), ids=batch.image_path)
        return torch.tensor(0.0, requires_grad=True, device=self.device)  # Lightning wants a loss

    def fit(self) -> None:
        """The torch model's bank from the collected tiles of every rank (called by ``MemoryBankMixin``).

        Under DDP every rank first merges all ranks' reservoirs (the one a single process would have filled, capped
        for the whole training set), then runs the same deterministic coreset: every rank holds the whole bank.
        """
        merged = gather_reservoir(self._reservoir, self.device)
        assert merged is not None  # the local reservoir is never None
        embeddings = merged.samples()
        logger.info("TileOutlier: fitting the bank on %d images x %d tiles", len(embeddings), self.model.grid.num_tiles)
        self._warn_when_the_bank_is_starved(len(embeddings))
        self.model.fit(embeddings.to(self.device))
        logger.info("TileOutlier: the bank holds %d tiles", self.model.bank_tiles)
        self._reservoir = self._new_reservoir()

    def _warn_when_the_bank_is_starved(self, num_images: int) -> None:
        """One line when the training tiles are fewer than the bank's cap: the coreset then keeps every tile, and
        each grid position has only ``num_images`` normal examples (magnetic tile at 10 normals: image AUROC 0.72)."""
        available = num_images * self.model.grid.num_tiles
        if available >= self.max_tiles:
            return
        logger.warning(
            "TileOutlier: %d training images give %d tiles, fewer than the bank's cap max_tiles=%d: the bank keeps "
            "all of them, %d normal examples per grid position",
            num_images,
            available,
            self.max_tiles,
            num_images,
        )

    def extend_bank(self, images: torch.Tensor) -> InferenceBatch:
        """Add pre-processed normal ``images`` of a new condition (a light, a shadow) to the tile bank, each tile at
        its grid position, no gradient step; returns their leave-one-out outputs for the thresholds
        (``extend_bank_held_out``). ``anomalib-ext recalibrate --extend-bank`` calls it.

        A bank that never saw the condition can rank its normal images above defects (a vignette on bottle: image
        AUROC 0.55, 1.000 with the bank extended); the condition's own tiles make it rank again, which a threshold
        alone cannot do."""
        model = self.model.eval()
        with torch.no_grad():
            embeddings = model.embed(images)
        held_out = extend_bank_held_out(model, embeddings, images, model)
        logger.info("TileOutlier: the bank holds %d tiles (%d new images added)", model.bank_tiles, len(images))
        return held_out

    # ------------------------------------------------------------------------------------------ inference
    def forward(self, batch: torch.Tensor, *args, **kwargs) -> Any:  # noqa: ANN401
        if self._fastdup is not None:
            self._refuse_export()
        return super().forward(batch, *args, **kwargs)

    def _refuse_export(self) -> None:
        msg = (
            "TileOutlier with backend='fastdup' cannot be exported: fastdup's embedding model runs outside torch. "
            "Use backend='torch' (the default) for OpenVINO/ONNX export."
        )
        raise NotImplementedError(msg)

    def to_onnx(self, *args, **kwargs) -> Any:  # noqa: ANN401
        if self._fastdup is not None:
            self._refuse_export()
        return super().to_onnx(*args, **kwargs)

    def to_openvino(self, *args, **kwargs) -> Any:  # noqa: ANN401
        if self._fastdup is not None:
            self._refuse_export()
        return super().to_openvino(*args, **kwargs)
