"""Fused in pure torch: one backbone pass feeds a tile-outlier map and a global feature density; both scores are
standardised on held-out normal scores and fused into the image score.

The two halves see different defects. Tile outliers (TileOutlier's method) see a small local change but miss a
change spread over the whole part (a wrong print, a different texture, a global shift); the density of pooled
features (Dfkdm's method) sees the global change and misses a small one. Their raw scores live on unrelated
scales (a cosine distance, a negative log likelihood), so each is standardised with the median and robust spread
of scores of normal images it has never seen (``fit`` cross-fits: every training image is scored by a model fitted
without it), then fused. Everything learnt is a buffer and ``forward`` in eval mode has no data-dependent control
flow, so the whole model, both halves and the fusion, exports as one graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import DynamicBufferMixin
from anomalib.models.components.feature_extractors import dryrun_find_featuremap_dims
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.models.components import (
    CROSS_FIT_FOLDS,
    ImageTiling,
    InputNormalization,
    InputNormalizer,
    build_feature_extractor,
    fold_indices,
    robust_center_scale,
)
from anomalib_ext.models.components.kde import FeatureDensity
from anomalib_ext.models.components.tile_scoring import TileOutlierScorer, build_tile_grid

logger = logging.getLogger(__name__)

Fusion = Literal["mean", "max"]
FUSIONS: tuple[str, ...] = ("mean", "max")
MIN_TRAINING_IMAGES = 3  # two folds of at least one held-out image, and a density needs two fit points


def cross_fitted_scores(
    data: torch.Tensor, fit_and_score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Each row's score from a model fitted without it: ``fit_and_score(kept rows, held-out rows)`` once per fold."""
    scores = torch.empty(len(data), device=data.device)
    everything = torch.arange(len(data), device=data.device)
    for held_out in fold_indices(len(data), min(CROSS_FIT_FOLDS, len(data))):
        held_out = held_out.to(data.device)
        scores[held_out] = fit_and_score(data[everything[~torch.isin(everything, held_out)]], data[held_out])
    return scores


def pooled_mean_and_spread(feature_map: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, 2C)``: each channel's mean over the image and the spread of its means over ``window`` x ``window``
    patches (one tile's footprint on that layer).

    The spread is what the mean misses on a texture: how strongly a channel varies across the surface, which a
    blowhole or a crack changes while leaving the mean nearly where it was. On magnetic tile it lets a density on
    TileOutlier's trunk (to ``blocks.4``) rank better than means of a trunk two stages deeper
    (docs/choosing_a_model.md). Averaging over a tile first measures the variation at the scale the tile half
    compares, and leaves out that of single activations (pixel noise, an INT8 trunk's rounding), which a mean
    cancels but a spread would add up.
    """
    mean = feature_map.mean((2, 3))
    local = F.avg_pool2d(feature_map, window, stride=1) if window > 1 else feature_map
    spread = (local - local.mean((2, 3), keepdim=True)).square().mean((2, 3)).sqrt()
    return torch.cat([mean, spread], dim=1)


def new_density() -> FeatureDensity:
    """Dfkdm's default density: standardised features, PCA keeping 97 % of the variance, probabilistic-PCA
    likelihood (a Gaussian inside the kept components, an isotropic Gaussian on the residual outside them)."""
    return FeatureDensity(density="gaussian", n_components=0.97, residual=True, feature_scaling="standardize")


class ScoreStandardizer(DynamicBufferMixin, nn.Module):
    """``(score - median) / spread`` of held-out normal scores: a typical normal image scores 0 whatever the scale."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        self.center: torch.Tensor
        self.scale: torch.Tensor

    def fit(self, normal_scores: torch.Tensor) -> None:
        # MAD, kept from collapsing by a quarter of the standard deviation when most held-out scores are equal
        center, scale = robust_center_scale(normal_scores.double(), min_scale=1e-12, std_fraction=0.25)
        self.center = center.float()
        self.scale = scale.float()

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.center) / self.scale


class FusedModel(nn.Module):
    """Tile outliers + global density on one pass of a pretrained backbone, on raw [0, 1] images.

    The arguments are ``Fused``'s (documented there), ``image_size`` as an ``(H, W)`` pair.
    """

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        backbone: str,
        tile_layers: Sequence[str],
        density_layers: Sequence[str],
        tile_size: int,
        stride: int,
        max_bank_tiles: int,
        map_sigma: float,
        fusion: Fusion,
        input_normalization: InputNormalization = "backbone",
        image_tiling: ImageTiling | None = None,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            msg = f"fusion must be one of {FUSIONS}, got '{fusion}'"
            raise ValueError(msg)
        if not tile_layers or not density_layers:
            msg = "tile_layers and density_layers must each name at least one backbone layer"
            raise ValueError(msg)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.image_tiling = image_tiling or ImageTiling()
        self.image_tiling.check(self.image_size)
        self.tile_layers, self.density_layers = list(tile_layers), list(density_layers)
        layers = list(dict.fromkeys([*self.tile_layers, *self.density_layers]))  # one pass, each layer once
        self.fusion = fusion
        self.normalize = InputNormalizer.for_backbone(backbone, input_normalization)
        self.feature_extractor = build_feature_extractor(backbone, layers, pre_trained=True)
        dims = dryrun_find_featuremap_dims(self.image_tiling.wrap(self.feature_extractor), self.image_size, layers)
        # each density layer's tile footprint, in its cells (a stride-16 layer: 2 x 2 cells for 32 px tiles)
        width = self.image_size[1]
        self.spread_windows = [
            max(1, round(tile_size * dims[layer]["resolution"][1] / width)) for layer in self.density_layers
        ]
        self.tiles = TileOutlierScorer(
            grid=build_tile_grid(self.image_size, None, tile_size, stride),
            layer_resolutions={layer: tuple(dims[layer]["resolution"]) for layer in self.tile_layers},
            position_aware=True,
            neighborhood=1,
            num_neighbors=1,
            max_bank_size=max_bank_tiles,
            map_sigma=map_sigma,
        )
        self.density = new_density()
        self.tile_standardizer = ScoreStandardizer()
        self.density_standardizer = ScoreStandardizer()

    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass: ``(B, rows, cols, D)`` tile embeddings and ``(B, C)`` global features (the mean and
        spread of every density layer)."""
        self.feature_extractor.eval()  # frozen: BatchNorm statistics must not move during "training"
        features = self.image_tiling.run(self.feature_extractor, self.normalize(images))
        pooled = [
            pooled_mean_and_spread(features[layer], window)
            for layer, window in zip(self.density_layers, self.spread_windows, strict=True)
        ]
        return self.tiles.pool_tiles(features), torch.cat(pooled, dim=1)

    def fuse(self, tile_score: torch.Tensor, density_score: torch.Tensor) -> torch.Tensor:
        """The image score from the two raw scores, each standardised on held-out normal scores."""
        tile_z, density_z = self.tile_standardizer(tile_score), self.density_standardizer(density_score)
        if self.fusion == "max":
            return torch.maximum(tile_z, density_z)
        return (tile_z + density_z) / 2

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | InferenceBatch:
        """Training: ``(tile embeddings, global features)`` to collect for ``fit``. Eval: ``InferenceBatch``."""
        tile_embeddings, global_features = self.extract(images)
        if self.training:
            return tile_embeddings, global_features
        tile_scores = self.tiles.tile_scores(tile_embeddings)
        pred_score = self.fuse(tile_scores.amax((1, 2)), self.density(global_features))
        return InferenceBatch(pred_score=pred_score, anomaly_map=self.tiles.paint(tile_scores))

    # ---------------------------------------------------------------------------------------------- fitting
    @torch.no_grad()
    def fit(self, tile_embeddings: torch.Tensor, global_features: torch.Tensor) -> None:
        """Cross-fit each half for its held-out normal scores (its standardiser), then fit both on every image.

        ``tile_embeddings`` (N, rows, cols, D) and ``global_features`` (M, C) need not be the same images: each
        half is standardised on its own held-out scores (the tile reservoir may keep fewer images than the
        density's features).
        """
        count = min(len(tile_embeddings), len(global_features))
        if count < MIN_TRAINING_IMAGES:
            msg = (
                f"Fused needs at least {MIN_TRAINING_IMAGES} training images to calibrate its two scores on held-out "
                f"normal images, got {count}"
            )
            raise ValueError(msg)
        self.tile_standardizer.fit(self._held_out_tile_scores(tile_embeddings))
        self.density_standardizer.fit(self._held_out_density_scores(global_features))
        self.tiles.fit(tile_embeddings)
        self.density.fit(global_features)
        if len(global_features) <= global_features.shape[1]:
            logger.warning(
                "Fused: %d training images for %d pooled feature dimensions: the global density keeps at most %d "
                "principal components; the tile score carries more of the decision until there are more images",
                len(global_features),
                global_features.shape[1],
                self.density.pca.output_dim,
            )

    def _held_out_tile_scores(self, tile_embeddings: torch.Tensor) -> torch.Tensor:
        def fit_and_score(kept: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
            self.tiles.fit(kept)
            return self.tiles.tile_scores(held).amax((1, 2))

        return cross_fitted_scores(tile_embeddings, fit_and_score)

    def _held_out_density_scores(self, global_features: torch.Tensor) -> torch.Tensor:
        def fit_and_score(kept: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
            density = new_density().to(kept.device)
            density.fit(kept)
            return density(held)

        return cross_fitted_scores(global_features, fit_and_score)
