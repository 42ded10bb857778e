"""Tile grids that cover a whole image, and the fixed matrices that pool features over tiles and paint back.

Every grid here is the product of row bands and column bands, so pooling features over tiles and painting tile
scores back onto the image are two small matrix products with matrices fixed at construction: no data-dependent
control flow, hence exportable. anomalib's ``Tiler`` pads or resizes the image until tiles fit; here the image
is never changed: the last band of a sliding grid is moved flush with the border, and ``num_parts`` bands differ
in length by at most one pixel, so sizes not divisible by the grid are covered exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anomalib_ext.models.components.filters import GaussianBlur


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        msg = f"{name} must be a positive integer, got {value!r}"
        raise ValueError(msg)


def split_bands(length: int, num_parts: int) -> list[tuple[int, int]]:
    """``num_parts`` contiguous bands covering ``[0, length)``; lengths differ by at most one.

    Same cut points as the origin's ``divide_image_with_coordinates``, but without dropping the remainder.
    """
    _check_positive("length", length)
    _check_positive("num_parts", num_parts)
    if num_parts > length:
        msg = f"num_parts ({num_parts}) cannot exceed the image side ({length} px)"
        raise ValueError(msg)
    cuts = [round(index * length / num_parts) for index in range(num_parts + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def sliding_bands(length: int, tile_size: int, stride: int) -> list[tuple[int, int]]:
    """Bands of ``tile_size`` every ``stride`` pixels; the last one is moved flush with the end of the side."""
    _check_positive("length", length)
    _check_positive("tile_size", tile_size)
    _check_positive("stride", stride)
    if tile_size > length:
        msg = f"tile_size ({tile_size}) cannot exceed the image side ({length} px)"
        raise ValueError(msg)
    if stride > tile_size:
        msg = f"stride ({stride}) larger than tile_size ({tile_size}) would leave pixels uncovered"
        raise ValueError(msg)
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] + tile_size < length:
        starts.append(length - tile_size)
    return [(start, start + tile_size) for start in starts]


@dataclass(frozen=True)
class TileGrid:
    """A ``rows x cols`` grid of tiles; tile ``(r, c)`` spans ``row_bands[r] x col_bands[c]`` in pixels."""

    image_size: tuple[int, int]
    row_bands: tuple[tuple[int, int], ...]
    col_bands: tuple[tuple[int, int], ...]

    @classmethod
    def from_num_parts(cls, image_size: tuple[int, int], num_parts: int) -> TileGrid:
        """``num_parts x num_parts`` non-overlapping tiles, as in the origin's segment grid."""
        height, width = image_size
        return cls(image_size, tuple(split_bands(height, num_parts)), tuple(split_bands(width, num_parts)))

    @classmethod
    def from_tile_size(cls, image_size: tuple[int, int], tile_size: int, stride: int | None = None) -> TileGrid:
        """Square tiles of ``tile_size`` every ``stride`` pixels (overlapping when ``stride < tile_size``)."""
        height, width = image_size
        stride = tile_size if stride is None else stride
        return cls(
            image_size,
            tuple(sliding_bands(height, tile_size, stride)),
            tuple(sliding_bands(width, tile_size, stride)),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.row_bands), len(self.col_bands)

    @property
    def num_tiles(self) -> int:
        return len(self.row_bands) * len(self.col_bands)

    def boxes(self) -> torch.Tensor:
        """``(num_tiles, 4)`` long tensor of ``(y0, x0, y1, x1)``, row-major (tile index = r * cols + c)."""
        return torch.tensor(
            [(y0, x0, y1, x1) for (y0, y1) in self.row_bands for (x0, x1) in self.col_bands], dtype=torch.long
        )

    # ---------------------------------------------------------------------------------- fixed matrices
    @staticmethod
    def _band_overlap(bands: tuple[tuple[int, int], ...], length: int, cells: int) -> torch.Tensor:
        """``(len(bands), cells)``: fraction of each band covered by each of ``cells`` equal cells of the side."""
        cell = length / cells
        edges = torch.arange(cells + 1, dtype=torch.float64) * cell
        starts = torch.tensor([band[0] for band in bands], dtype=torch.float64)[:, None]
        ends = torch.tensor([band[1] for band in bands], dtype=torch.float64)[:, None]
        overlap = (torch.minimum(ends, edges[None, 1:]) - torch.maximum(starts, edges[None, :-1])).clamp(min=0)
        return (overlap / (ends - starts)).float()

    def pooling_matrices(self, feature_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Area-weighted averaging of a ``feature_size`` map over each tile: ``rows x h`` and ``cols x w``.

        ``pooled = rows_matrix @ features @ cols_matrix.T`` gives the mean of the feature map over each tile.
        """
        height, width = self.image_size
        return (
            self._band_overlap(self.row_bands, height, feature_size[0]),
            self._band_overlap(self.col_bands, width, feature_size[1]),
        )

    def painting_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Binary band membership, ``rows x H`` and ``cols x W``, for painting tile scores back to pixels."""
        height, width = self.image_size
        row_member = torch.zeros(len(self.row_bands), height)
        col_member = torch.zeros(len(self.col_bands), width)
        for index, (start, end) in enumerate(self.row_bands):
            row_member[index, start:end] = 1
        for index, (start, end) in enumerate(self.col_bands):
            col_member[index, start:end] = 1
        return row_member, col_member


def painting_operators(grid: TileGrid, blur: GaussianBlur | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H x rows, cols x W)`` matrices that paint tile scores back to pixels, ``left @ scores @ right``: each
    pixel the mean of the tiles covering it, then ``blur`` (separable and linear, so it folds into both matrices:
    the smoothed map costs two small products instead of two image-sized convolutions)."""
    row_member, col_member = grid.painting_matrices()
    left = row_member.T / row_member.sum(0)[:, None]  # (H, rows): a pixel row averages the row bands over it
    right = col_member / col_member.sum(0)[None, :]  # (cols, W)
    if blur is not None:
        height, width = grid.image_size
        left = blur.matrix(height) @ left
        right = right @ blur.matrix(width).T
    return left.contiguous(), right.contiguous()


def paint_tile_scores(scores: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``(B, rows, cols)`` tile scores -> ``(B, H, W)`` map, with the matrices of :func:`painting_operators`."""
    return left @ scores @ right
