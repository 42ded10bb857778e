"""Tile-outlier scoring on a fixed tile grid: pooled tile embeddings, a capped memory bank of normal tiles, the
nearest-neighbour score of every tile and the painted map.

Shared by every model that scores tiles against normal tiles (TileOutlier, and the fused default that adds a
global density on the same backbone pass). Everything that depends on the image size (pooling and painting
matrices, neighbourhood gathers) is fixed at construction, and the bank is a buffer, so scoring is a fixed graph
that exports to OpenVINO.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import DynamicBufferMixin
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.models.components.filters import GaussianBlur
from anomalib_ext.models.components.sampling import greedy_coreset_indices, grouped_greedy_coreset_indices
from anomalib_ext.models.components.tiling import TileGrid, paint_tile_scores, painting_operators

# the similarity given to padding outside the grid: below any cosine similarity, so never a nearest neighbour
_OUTSIDE_GRID = -4.0


def build_tile_grid(
    image_size: tuple[int, int], num_parts: int | None, tile_size: int | None, stride: int | None
) -> TileGrid:
    """The grid from either ``num_parts`` or ``tile_size`` (+ ``stride``); exactly one must be given."""
    if (num_parts is None) == (tile_size is None):
        msg = f"give exactly one of num_parts or tile_size, got num_parts={num_parts}, tile_size={tile_size}"
        raise ValueError(msg)
    if num_parts is not None:
        if stride is not None:
            msg = "stride only applies with tile_size; num_parts tiles do not overlap"
            raise ValueError(msg)
        return TileGrid.from_num_parts(image_size, num_parts)
    return TileGrid.from_tile_size(image_size, tile_size, stride)


def neighbourhood_indices(shape: tuple[int, int], radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices of the position-aware search of radius ``r``, for offset indices ``d = (dy, dx)`` in
    ``[0, 2r]^2`` (row-major, ``n = (2r + 1)^2`` of them), so the true offset is ``d - r``.

    ``query_index[q * n + d]``: in the tile grid padded by ``r`` on each side, flattened, the tile ``q - (d - r)``
    that bank position ``q`` is compared with. ``pick_index[p * n + d]``: in the ``(rows + 2r, cols + 2r, n)``
    similarities (bank positions padded by ``r``), flattened, the one of tile ``p`` to bank position
    ``p + (d - r)``. Two gathers instead of stacking ``n`` shifted grids (a slow Concat in OpenVINO).
    """
    rows, cols = shape
    span = 2 * radius + 1
    padded_cols = cols + 2 * radius
    row, col, dy, dx = torch.meshgrid(
        torch.arange(rows), torch.arange(cols), torch.arange(span), torch.arange(span), indexing="ij"
    )
    query_index = (row + 2 * radius - dy) * padded_cols + (col + 2 * radius - dx)
    pick_index = ((row + dy) * padded_cols + (col + dx)) * span * span + dy * span + dx
    return query_index.reshape(-1), pick_index.reshape(-1)


def normalise_and_join(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """L2-normalise each layer's embedding (so each counts equally), concatenate, normalise again."""
    joined = torch.cat([F.normalize(embedding, dim=-1) for embedding in per_layer], -1)
    return F.normalize(joined, dim=-1)


class BankSimilarity(nn.Module):
    """The search's product with the bank: cosine similarities of unit-norm tile embeddings with bank tiles.

    A module of its own so that an INT8 export can quantise this product (``int8_modules``:
    ``model.bank_similarity``): the bank becomes an INT8 constant (a quarter of the bytes to read per image) and the
    queries INT8 activations over [-1, 1], the bound of a unit vector's components (``quantization.UNIT_VECTOR_MODULES``
    names this module). One symmetric scale per tensor loses little there (bottle: INT8 image and pixel AUROC as with
    the backbone alone in INT8; docs/edge.md). The product is most of the search's time in float. The
    position-aware search's gather of each bank position's queries is inside too: NNCF then rounds the tiles once,
    before the gather, which moves INT8 bytes, instead of the gathered, ``(2r + 1)^2`` times larger queries. The
    top-k, the pick of each tile's best similarities and the painting stay in float.
    """

    def forward(
        self, queries: torch.Tensor, bank: torch.Tensor, query_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(..., Q, D) x (..., M, D) -> (..., Q, M)`` similarities. With ``query_index``, ``queries`` are the
        ``(N, B, D)`` tiles of the padded grid and the index picks the ``(P * n)`` of them (``n`` per bank position,
        ``neighbourhood_indices``) that each of the ``P`` bank positions is compared with: ``(P, n * B, M)``."""
        if query_index is not None:
            queries = queries.index_select(0, query_index).reshape(bank.shape[0], -1, queries.shape[-1])
        return queries @ bank.transpose(-2, -1)


class TileOutlierScorer(DynamicBufferMixin, nn.Module):
    """Score every tile by ``1 -`` cosine similarity to its nearest normal tiles; paint the scores back.

    Args:
        grid: the tile grid over the pre-processed image.
        layer_resolutions: ``{layer: (h, w)}`` of the backbone feature maps that ``pool_tiles`` averages over each
            tile, in the order they are joined (``None``: the caller embeds tiles its own way).
        position_aware, neighborhood, num_neighbors: which bank tiles a tile is compared with and how many make
            its score (``SearchSettings`` of TileOutlier).
        max_bank_size: cap on the bank's tiles, reached with a greedy k-center coreset.
        map_sigma: Gaussian smoothing of the painted map, pixels.
        tile_chunk: tiles compared at once in the global (not position-aware) search, bounding memory.
    """

    def __init__(
        self,
        *,
        grid: TileGrid,
        layer_resolutions: Mapping[str, tuple[int, int]] | None,
        position_aware: bool,
        neighborhood: int,
        num_neighbors: int,
        max_bank_size: int,
        map_sigma: float,
        tile_chunk: int = 256,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_neighbors", num_neighbors),
            ("max_bank_size", max_bank_size),
            ("tile_chunk", tile_chunk),
        ):
            if not isinstance(value, int) or value <= 0:
                msg = f"{name} must be a positive integer, got {value!r}"
                raise ValueError(msg)
        if not isinstance(neighborhood, int) or neighborhood < 0:
            msg = f"neighborhood must be a non-negative integer, got {neighborhood!r}"
            raise ValueError(msg)
        if map_sigma < 0:
            msg = f"map_sigma must be >= 0, got {map_sigma}"
            raise ValueError(msg)
        self.grid = grid
        self.pooled_layers = list(layer_resolutions or {})
        self.position_aware = position_aware
        self.neighborhood = neighborhood if position_aware else 0
        self.num_neighbors = num_neighbors
        self.max_bank_size = max_bank_size
        self.tile_chunk = tile_chunk
        for index, resolution in enumerate((layer_resolutions or {}).values()):
            row_pool, col_pool = grid.pooling_matrices(tuple(resolution))
            self.register_buffer(f"row_pool_{index}", row_pool, persistent=False)
            self.register_buffer(f"col_pool_{index}", col_pool, persistent=False)
        # painting and the map's Gaussian smoothing, folded into two matrices (left @ scores @ right)
        paint_left, paint_right = painting_operators(grid, GaussianBlur(map_sigma, truncate=4.0))
        self.register_buffer("paint_left", paint_left, persistent=False)
        self.register_buffer("paint_right", paint_right, persistent=False)
        query_index, pick_index = neighbourhood_indices(grid.shape, self.neighborhood)
        self.register_buffer("query_index", query_index, persistent=False)
        self.register_buffer("pick_index", pick_index, persistent=False)
        # bank: (rows + 2r, cols + 2r, M, D) position-aware (zero padding outside the grid, kept so checkpoints
        # keep their layout; scoring reads the inner grid only), else (M, D)
        self.memory_bank: torch.Tensor
        self.register_buffer("memory_bank", torch.empty(0))
        self.bank_similarity = BankSimilarity()

    # ------------------------------------------------------------------------------------------ embedding
    def pool_tiles(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B, rows, cols, D)`` unit-norm tile embeddings: each layer's map averaged over each tile's area."""
        per_layer = []
        for index, layer in enumerate(self.pooled_layers):
            row_pool = getattr(self, f"row_pool_{index}")  # (rows, h)
            col_pool = getattr(self, f"col_pool_{index}")  # (cols, w)
            # channels last from the start: an INT8 backbone hands over channels-last maps, and pooling them in
            # (B, C, h, w) made OpenVINO reorder each one first (0.3-3.4 ms per image at the bottle config)
            channels_last = features[layer].permute(0, 2, 3, 1)  # (B, h, w, C)
            batch, height, width, channels = channels_last.shape
            pooled = row_pool @ channels_last.reshape(batch, height, width * channels)  # (B, rows, w * C)
            per_layer.append(col_pool @ pooled.reshape(batch, -1, width, channels))  # (B, rows, cols, C)
        return normalise_and_join(per_layer)

    # -------------------------------------------------------------------------------------------- scoring
    def _top_similarities(self, similarities: torch.Tensor) -> torch.Tensor:
        if self.num_neighbors == 1:  # a max is several times cheaper than a top-k in OpenVINO
            return similarities.amax(-1, keepdim=True)
        return similarities.topk(min(self.num_neighbors, similarities.shape[-1]), dim=-1).values

    def tile_scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, rows, cols)`` outlier scores: ``1 -`` mean cosine similarity of the ``k`` nearest bank tiles.

        Position-aware, every bank position is read once per image: each bank position ``q`` is compared with
        the ``(2r + 1)^2`` tiles ``q - d`` that look at it (one batched matmul over positions), and each tile then
        picks up its best similarities from the bank positions ``p + d`` around it. Comparing each tile with its
        neighbourhood's banks directly reads every bank position ``(2r + 1)^2`` times, and the exported graph
        held that many copies of the bank (364 MB instead of 42 MB at the bottle config); the scores are the same.
        """
        if self.memory_bank.numel() == 0:  # a shape, fixed when traced: not data-dependent
            msg = "the tile bank is empty: fit it on normal images before scoring"
            raise RuntimeError(msg)
        batch, rows, cols, dim = embeddings.shape
        if self.position_aware:
            pad = self.neighborhood
            offsets = (2 * pad + 1) ** 2
            bank = self.memory_bank[pad : pad + rows, pad : pad + cols].reshape(rows * cols, -1, dim)  # (P, M, D)
            # tiles first, then the batch, zero tiles outside the grid: the gather along the first axis then gives
            # every bank position its queries in the product's layout (gathering along the second axis needed a
            # transpose of the gathered, offsets times larger, queries: 0.4-1.2 ms in OpenVINO at the bottle config)
            padded = F.pad(embeddings.permute(1, 2, 0, 3), (0, 0, 0, 0, pad, pad, pad, pad)).reshape(-1, batch, dim)
            # bank position q meets the tiles q - d: one gather (a stack of shifted grids ran OpenVINO's slow Concat)
            similarities = self.bank_similarity(padded, bank, self.query_index)  # (P, offsets * B, M): one bank read
            best = self._top_similarities(similarities)
            best = best.reshape(rows, cols, offsets, batch, -1).permute(3, 0, 1, 2, 4)  # (B, R, C, offsets, k)
            # tile p finds its similarity to bank position p + d at offset index d; outside the grid: below any cosine
            best = F.pad(best, (0, 0, 0, 0, pad, pad, pad, pad), value=_OUTSIDE_GRID).reshape(batch, -1, best.shape[-1])
            nearest = best.index_select(1, self.pick_index).reshape(batch, rows, cols, -1)  # (B, R, C, offsets * k)
            return 1 - self._top_similarities(nearest).mean(-1)
        flat = embeddings.reshape(batch, rows * cols, dim)
        chunks = []
        for start in range(0, rows * cols, self.tile_chunk):  # fixed by the grid, not by the data
            similarity = self.bank_similarity(flat[:, start : start + self.tile_chunk], self.memory_bank)
            chunks.append(1 - self._top_similarities(similarity).mean(-1))
        return torch.cat(chunks, 1).view(batch, rows, cols)

    def paint(self, scores: torch.Tensor) -> torch.Tensor:
        """``(B, rows, cols)`` tile scores -> ``(B, 1, H, W)`` smoothed map (one pair of matrix products)."""
        return paint_tile_scores(scores, self.paint_left, self.paint_right).unsqueeze(1)

    # ---------------------------------------------------------------------------------------------- fitting
    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor) -> None:
        """Build the capped bank from ``(N, rows, cols, D)`` normal tile embeddings."""
        if embeddings.ndim != 4 or tuple(embeddings.shape[1:3]) != self.grid.shape:
            rows, cols = self.grid.shape
            msg = f"expected (N, {rows}, {cols}, D) tile embeddings, got {tuple(embeddings.shape)}"
            raise ValueError(msg)
        count, rows, cols, dim = embeddings.shape
        if self.position_aware:
            per_position = max(1, self.max_bank_size // (rows * cols))
            grouped = embeddings.permute(1, 2, 0, 3).reshape(rows * cols, count, dim)
            picked = grouped_greedy_coreset_indices(grouped, per_position)  # (P, M)
            bank = torch.gather(grouped, 1, picked[..., None].expand(-1, -1, dim)).view(rows, cols, -1, dim)
            pad = self.neighborhood
            self.memory_bank = F.pad(bank, (0, 0, 0, 0, pad, pad, pad, pad)).contiguous()
        else:
            flat = embeddings.reshape(-1, dim)
            self.memory_bank = flat[greedy_coreset_indices(flat, self.max_bank_size)].contiguous()

    @torch.no_grad()
    def extend(self, embeddings: torch.Tensor) -> None:
        """Add ``(N, rows, cols, D)`` tile embeddings to the fitted bank as they are, every tile kept (no coreset:
        a few images of a new condition are each worth keeping, and the bank's older tiles stay as chosen)."""
        if self.memory_bank.numel() == 0:
            msg = "the tile bank is empty: fit it before extending it"
            raise RuntimeError(msg)
        if embeddings.ndim != 4 or tuple(embeddings.shape[1:3]) != self.grid.shape:
            rows, cols = self.grid.shape
            msg = f"expected (N, {rows}, {cols}, D) tile embeddings, got {tuple(embeddings.shape)}"
            raise ValueError(msg)
        embeddings = embeddings.to(self.memory_bank)
        if not self.position_aware:
            self.memory_bank = torch.cat([self.memory_bank, embeddings.reshape(-1, embeddings.shape[-1])]).contiguous()
            return
        pad = self.neighborhood
        rows, cols = self.grid.shape
        inner = self.memory_bank[pad : pad + rows, pad : pad + cols]
        extended = torch.cat([inner, embeddings.permute(1, 2, 0, 3)], dim=2)
        self.memory_bank = F.pad(extended, (0, 0, 0, 0, pad, pad, pad, pad)).contiguous()

    @property
    def bank_tiles(self) -> int:
        """Number of real (non-padding) tiles in the bank."""
        if self.memory_bank.numel() == 0:
            return 0
        if self.position_aware:
            return self.grid.num_tiles * self.memory_bank.shape[2]
        return self.memory_bank.shape[0]


@torch.no_grad()
def extend_bank_held_out(
    scorer: TileOutlierScorer,
    embeddings: torch.Tensor,
    images: torch.Tensor,
    model: Callable[[torch.Tensor], InferenceBatch],
) -> InferenceBatch:
    """Extend ``scorer``'s bank by the ``(N, rows, cols, D)`` tile ``embeddings`` of ``images`` (normal images of a
    new condition) and return the images' leave-one-out outputs: each scored by ``model`` (the torch model that
    holds ``scorer``) against the bank extended by the others only.

    Those are the scores to set thresholds on: an unseen image of the condition scores like them, while against a
    bank that holds its own tiles an image matches itself exactly and scores 0."""
    fitted = scorer.memory_bank
    held_out = []
    for index in range(len(images)):
        scorer.memory_bank = fitted
        others = torch.cat([embeddings[:index], embeddings[index + 1 :]])
        if len(others):
            scorer.extend(others)
        held_out.append(model(images[index : index + 1]))
    scorer.memory_bank = fitted
    scorer.extend(embeddings)
    return InferenceBatch(
        pred_score=torch.cat([output.pred_score.flatten() for output in held_out]),
        anomaly_map=torch.cat([output.anomaly_map for output in held_out]),
    )
