"""TileOutlier in pure torch: tile embeddings, nearest-neighbour outlier scores, scores painted back.

Everything that depends on the image size (tile grid, pooling, crop sampling and painting matrices) is fixed
at construction from ``image_size``, and everything learned (the memory bank) is a buffer, so the eval forward
is a fixed graph that exports to OpenVINO.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.feature_extractors import dryrun_find_featuremap_dims
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.models.components import InputNormalization, InputNormalizer, build_feature_extractor
from anomalib_ext.models.components.image_tiling import ImageTiling
from anomalib_ext.models.components.tile_scoring import TileOutlierScorer, build_tile_grid, normalise_and_join

EMBED_MODES = ("pool", "crop")


class TileOutlierModel(TileOutlierScorer):
    """Embed every tile, score it by ``1 - cosine`` similarity to its nearest normal tiles.

    Takes raw [0, 1] images; the backbone's input normalisation happens inside. The arguments without a default
    are ``TileOutlier``'s, its settings groups flattened (documented there and in ``TilingSettings``,
    ``SearchSettings`` and ``MemoryBankSettings``, with their defaults); ``image_size`` is the ``(H, W)`` pair and
    ``max_bank_size`` is ``MemoryBankSettings.max_tiles``. The other:

    Args:
        image_tiling: where the backbone runs on tiles of the image (``ImageTiling``; off by default).
        tile_chunk: tiles processed at once when scoring or cropping, bounding memory.
    """

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        num_parts: int | None,
        tile_size: int | None,
        stride: int | None,
        embed: str,
        backbone: str,
        layers: Sequence[str],
        input_normalization: InputNormalization,
        pre_trained: bool,
        crop_size: int | None,
        position_aware: bool,
        neighborhood: int,
        num_neighbors: int,
        max_bank_size: int,
        map_sigma: float,
        image_tiling: ImageTiling | None = None,
        tile_chunk: int = 256,
    ) -> None:
        if embed not in EMBED_MODES:
            msg = f"embed must be one of {EMBED_MODES}, got '{embed}'"
            raise ValueError(msg)
        size = (int(image_size[0]), int(image_size[1]))
        image_tiling = image_tiling or ImageTiling()
        image_tiling.check(size)
        if image_tiling.enabled and embed != "pool":
            msg = "image_tiling needs tiling.embed 'pool' ('crop' already embeds every tile on its own)"
            raise ValueError(msg)
        grid = build_tile_grid(size, num_parts, tile_size, stride)
        feature_extractor = build_feature_extractor(backbone, list(layers), pre_trained=pre_trained)
        resolutions = None
        if embed == "pool":
            dims = dryrun_find_featuremap_dims(image_tiling.wrap(feature_extractor), size, list(layers))
            resolutions = {layer: tuple(dims[layer]["resolution"]) for layer in layers}
        super().__init__(
            grid=grid,
            layer_resolutions=resolutions,
            position_aware=position_aware,
            neighborhood=neighborhood,
            num_neighbors=num_neighbors,
            max_bank_size=max_bank_size,
            map_sigma=map_sigma,
            tile_chunk=tile_chunk,
        )
        self.image_size = size
        self.embed_mode = embed
        self.image_tiling = image_tiling
        self.layers = list(layers)
        # replaces the backbone embedding (fastdup backend): a plain attribute, so never part of an export
        self.external_embedder: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.normalize = InputNormalizer.for_backbone(backbone, input_normalization)
        self.feature_extractor = feature_extractor
        if embed == "crop":
            sides = [end - start for start, end in (*self.grid.row_bands, *self.grid.col_bands)]
            self.crop_size = int(crop_size or max(sides))
            self.register_buffer("crop_grid", self._crop_sampling_grid(), persistent=False)

    # ------------------------------------------------------------------------------------------ embedding
    def _crop_sampling_grid(self) -> torch.Tensor:
        """``(1, T * crop, crop, 2)`` normalised sampling positions of every tile's crop, for ``grid_sample``."""
        height, width = self.image_size
        steps = (torch.arange(self.crop_size, dtype=torch.float64) + 0.5) / self.crop_size
        grids = []
        for y0, y1 in self.grid.row_bands:
            for x0, x1 in self.grid.col_bands:
                ys = (y0 + steps * (y1 - y0)) / height * 2 - 1
                xs = (x0 + steps * (x1 - x0)) / width * 2 - 1
                yy, xx = torch.meshgrid(ys, xs, indexing="ij")
                grids.append(torch.stack((xx, yy), -1))
        return torch.cat(grids, 0)[None].float()

    def _embed_pool(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool_tiles(self.image_tiling.run(self.feature_extractor, self.normalize(images)))

    def _embed_crop(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        rows, cols = self.grid.shape
        crop = self.crop_size
        embeddings = []
        for start in range(0, self.grid.num_tiles, self.tile_chunk):  # fixed by the grid, not by the data
            stop = min(start + self.tile_chunk, self.grid.num_tiles)
            sampling = self.crop_grid[:, start * crop : stop * crop].expand(batch, -1, -1, -1)
            crops = F.grid_sample(images, sampling, mode="bilinear", align_corners=False)  # (B, C, n*crop, crop)
            crops = crops.view(batch, images.shape[1], stop - start, crop, crop).transpose(1, 2)
            features = self.feature_extractor(self.normalize(crops.reshape(-1, images.shape[1], crop, crop)))
            per_layer = [features[layer].mean((2, 3)).view(batch, stop - start, -1) for layer in self.layers]
            embeddings.append(normalise_and_join(per_layer))
        return torch.cat(embeddings, 1).view(batch, rows, cols, -1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, rows, cols, D)`` unit-norm tile embeddings of raw [0, 1] images."""
        if self.external_embedder is not None:
            return self.external_embedder(images).to(images.device)
        return self._embed_pool(images) if self.embed_mode == "pool" else self._embed_crop(images)

    # -------------------------------------------------------------------------------------------- scoring
    def scores_to_batch(self, scores: torch.Tensor) -> InferenceBatch:
        """Paint tile scores back, smoothed (one pair of matrices); the image score is the highest tile."""
        return InferenceBatch(pred_score=scores.amax((1, 2)), anomaly_map=self.paint(scores))

    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Training: tile embeddings ``(B, rows, cols, D)`` for the bank. Eval: ``InferenceBatch``."""
        embeddings = self.embed(images)
        if self.training:
            return embeddings
        if self.memory_bank.numel() == 0:  # a shape, fixed when traced: not data-dependent
            msg = "TileOutlier has an empty memory bank: fit it on normal images before inference"
            raise RuntimeError(msg)
        return self.scores_to_batch(self.tile_scores(embeddings))
