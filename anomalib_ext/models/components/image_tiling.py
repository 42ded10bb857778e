"""A network run on tiles of the full-resolution image, its outputs stitched back: anomalib's ``Tiler`` around any
module.

A plant camera gives 2-20 megapixels; shrunk to 256 px, a scratch of a few pixels becomes less than one. A model
with ``image_tiling`` keeps the camera's resolution (its ``image_size`` is the large size) and runs its network
(backbone, teacher and student, autoencoder) on tiles of it, the way anomalib's Padim and PatchCore use their
``tiler``: tiles go through the network ``tile_batch`` grid positions at a time, so the network's activations are
bounded by the tile batch, not by the image, and every spatial output (feature maps, a reconstruction) is
stitched back with overlapping tiles averaged. The rest of the model (tile grid, memory bank, density, maps) then
sees full-resolution features as if the network had seen the whole image, and its bank caps hold over all tiles
of all images. The grid is fixed by the image size, so the stitched forward is a fixed graph: the exported model
takes the full-size image and tiles inside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from anomalib.data.utils.tiler import Tiler
from torch import nn

from anomalib_ext.models.components.settings import Settings

Output = TypeVar("Output")


@dataclasses.dataclass(frozen=True)
class ImageTiling(Settings):
    """Where the network runs on tiles of the pre-processed image (``tile_size: null``: on the whole image).

    Args:
        tile_size: tile side, pixels of the pre-processed image (the model's ``image_size``). Use the size the
            network was made for (256 for the backbones here, the autoencoder's training size).
        stride: step between tiles (``tile_size`` when ``null``). ``stride < tile_size`` overlaps tiles: seams,
            where a convolution sees the tile's zero padding instead of the neighbouring pixels, are averaged
            with the overlapping tile's view. Tiles and stride must be multiples of the network's total
            downsampling (32 for ``blocks.6``) so that stitched feature maps line up.
        tile_batch: grid positions whose tiles go through the network together (times the image batch): the
            bound on the network's memory. 1 gives the network batches of the image batch size, as at a small
            image size (4 measured 1.4x slower on a CPU: larger activations fall out of the cache).
    """

    tile_size: int | None = None
    stride: int | None = None
    tile_batch: int = 1

    @property
    def enabled(self) -> bool:
        return self.tile_size is not None

    def check(self, image_size: tuple[int, int] | None) -> None:
        """Raise a one-line error for tiles that cannot cover ``image_size`` (``None``: a model that does not know its
        image size, which tiling needs)."""
        if self.tile_size is not None and image_size is None:
            msg = "image_tiling needs the image_size the tiles cover"
            raise ValueError(msg)
        if self.tile_size is None:
            if self.stride is not None:
                msg = "image_tiling.stride is set without image_tiling.tile_size"
                raise ValueError(msg)
            return
        stride = self.tile_size if self.stride is None else self.stride
        for name, value in (("tile_size", self.tile_size), ("stride", stride), ("tile_batch", self.tile_batch)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                msg = f"image_tiling.{name} must be a positive integer, got {value!r}"
                raise ValueError(msg)
        if stride > self.tile_size:
            msg = f"image_tiling.stride ({stride}) larger than tile_size ({self.tile_size}) would leave pixels unseen"
            raise ValueError(msg)
        if self.tile_size > min(image_size):
            msg = f"image_tiling.tile_size ({self.tile_size}) exceeds the image size {tuple(image_size)}"
            raise ValueError(msg)
        for side in image_size:
            if (side - self.tile_size) % stride:
                msg = (
                    f"image_tiling: tiles of {self.tile_size} every {stride} px do not cover a {side} px side "
                    f"exactly; choose a stride that divides {side} - {self.tile_size}"
                )
                raise ValueError(msg)

    def wrap(self, network: nn.Module) -> nn.Module:
        """``network`` itself when tiling is off, else a module running ``network`` on tiles: for a dry run of the
        stitched feature sizes. A model keeps its network where it was and calls :meth:`run`, so its state dict
        does not move and the exported operations keep the network's module path (``model.feature_extractor``),
        which the INT8 recipe selects by."""
        if self.tile_size is None:
            return network
        return TiledNetwork(network, self.tile_size, self.stride or self.tile_size, self.tile_batch)

    def run(self, network: Callable[[torch.Tensor], Any], images: torch.Tensor) -> Any:  # noqa: ANN401
        """``network(images)``, on tiles when tiling is on (checked against the image size by :meth:`check`).
        ``network`` is a module or a method that calls one (a backbone followed by pooling, whose per-tile vectors
        then stay per tile)."""
        if self.tile_size is None:
            return network(images)
        return TiledCall(network, self.tile_size, self.stride or self.tile_size, self.tile_batch)(images)


class TiledCall:
    """``network`` on tiles of the input, every spatial output stitched back with anomalib's ``Tiler``.

    Not a module: the network is called from the caller's own forward, so it keeps its place in the module tree.
    Outputs may be a tensor, a mapping of tensors (a feature extractor's layers) or a NamedTuple of them (an
    autoencoder's reconstruction and code). A 4-D tensor is spatial and is stitched; any other tensor (a code per
    tile) is returned per tile, ``(batch * tiles, ...)``, image-major.
    """

    def __init__(self, network: Callable[[torch.Tensor], Any], tile_size: int, stride: int, tile_batch: int) -> None:
        self.network = network
        self.tile_batch = tile_batch
        self.tiler = Tiler(tile_size=tile_size, stride=stride)

    def __call__(self, images: torch.Tensor) -> Any:  # noqa: ANN401 - whatever the wrapped network returns
        tiles = self.tiler.tile(images)  # (B * n, C, t, t), image-major
        batch = images.shape[0]
        per_image = tiles.view(batch, -1, *tiles.shape[1:])
        positions = per_image.shape[1]  # fixed by the image size: the chunk loop is not data-dependent
        # an exported graph calls the network once on every tile: a network called once per chunk shares its
        # weights between calls, the exporter then leaves its batch norms unfolded, and OpenVINO names the fused
        # convolutions anew, outside the module the INT8 recipe quantises (measured: 0 of 132 convolutions in INT8)
        step = positions if _exporting() else self.tile_batch
        outputs = [
            self.network(per_image[:, start : start + step].reshape(-1, *tiles.shape[1:]))
            for start in range(0, positions, step)
        ]
        chunk_sizes = [min(step, positions - start) for start in range(0, positions, step)]
        return _map_outputs(outputs, lambda parts: self._stitch(parts, batch, chunk_sizes))

    def _stitch(self, parts: list[torch.Tensor], batch: int, chunk_sizes: list[int]) -> torch.Tensor:
        # each chunk is (B * k, ...) image-major: back to (B, k, ...), joined over positions, then (B * n, ...)
        joined = torch.cat(
            [part.view(batch, size, *part.shape[1:]) for part, size in zip(parts, chunk_sizes, strict=True)], 1
        )
        flat = joined.reshape(-1, *joined.shape[2:])
        if flat.dim() != 4:  # a code per tile: nothing to stitch
            return flat
        height, width = flat.shape[-2:]
        if (self.tiler.stride_h * height) % self.tiler.tile_size_h or (
            self.tiler.stride_w * width
        ) % self.tiler.tile_size_w:
            msg = (
                f"image_tiling: a {height}x{width} output of a {self.tiler.tile_size_h} px tile cannot be stitched "
                f"at stride {self.tiler.stride_h}: make tile_size and stride multiples of the network's downsampling"
            )
            raise ValueError(msg)
        return self.tiler.untile(flat)


class TiledNetwork(nn.Module):
    """:class:`TiledCall` as a module (``ImageTiling.wrap``), for code that takes a module, like anomalib's
    ``dryrun_find_featuremap_dims``."""

    def __init__(self, network: nn.Module, tile_size: int, stride: int, tile_batch: int) -> None:
        super().__init__()
        self.network = network
        self.tiled_call = TiledCall(network, tile_size, stride, tile_batch)

    def forward(self, images: torch.Tensor) -> Any:  # noqa: ANN401 - whatever the wrapped network returns
        return self.tiled_call(images)


def _exporting() -> bool:
    """Inside an ONNX/OpenVINO export (dynamo or TorchScript tracing), where the graph is fixed once."""
    return bool(torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing())


def _map_outputs(outputs: list[Output], join: Callable[[list[torch.Tensor]], torch.Tensor]) -> Output:
    """Apply ``join`` to the per-chunk tensors of every field of the network's output (tensor, mapping, NamedTuple)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return join(outputs)
    if isinstance(first, Mapping):
        return type(first)({key: join([output[key] for output in outputs]) for key in first})
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        fields = {
            name: None if value is None else join([getattr(output, name) for output in outputs])
            for name, value in zip(first._fields, first, strict=True)
        }
        return type(first)(**fields)
    msg = f"image_tiling cannot stitch a network output of type {type(first).__name__}"
    raise TypeError(msg)
