"""``image_tiling``: a model's network run on tiles of a large image, its outputs stitched (components/image_tiling.py).

The stitching itself is checked against the whole-image output of a network whose outputs do not see across tile
borders; the models' use of it (a small defect the shrunk image loses and the tiled model finds, export parity on
the full-size image) is in ``test_large_images.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

from anomalib_ext.models import Dfkdm, Fused, Reconstruction, TeacherStudent, TileOutlier
from anomalib_ext.models.components import ImageTiling


class _Output(NamedTuple):
    features: torch.Tensor
    code: torch.Tensor
    nothing: torch.Tensor | None


class _LocalNetwork(nn.Module):
    """Per-pixel 1x1 convolution then 4x4 average pooling: every output cell depends on its own 4x4 pixels only,
    so tiles on a 4-pixel lattice stitch back exactly to the whole-image output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)
        self.pool = nn.AvgPool2d(4)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = self.conv(images)
        return {"full": pixels, "quarter": self.pool(pixels)}


def test_stitched_outputs_equal_the_whole_image_output_at_every_scale() -> None:
    network = _LocalNetwork().eval()
    images = torch.rand(2, 3, 96, 64)
    tiling = ImageTiling(tile_size=32, stride=16, tile_batch=3)  # overlapping tiles, several chunks
    tiling.check((96, 64))
    with torch.no_grad():
        whole, tiled = network(images), tiling.run(network, images)
    assert set(tiled) == {"full", "quarter"}
    for key in whole:
        assert tiled[key].shape == whole[key].shape
        torch.testing.assert_close(tiled[key], whole[key], atol=1e-5, rtol=1e-5)


def test_codes_per_tile_stay_per_tile_and_missing_fields_stay_missing() -> None:
    """An autoencoder's output: its reconstruction is stitched, its code (one per tile) is not, ``None`` passes."""

    class _Coder(nn.Module):
        def forward(self, images: torch.Tensor) -> _Output:
            return _Output(features=images * 2, code=images.mean((2, 3)), nothing=None)

    images = torch.rand(2, 3, 64, 64)
    output = ImageTiling(tile_size=32).run(_Coder(), images)  # 2 x 2 tiles per image
    torch.testing.assert_close(output.features, images * 2)
    assert output.code.shape == (2 * 4, 3)
    torch.testing.assert_close(output.code[0], images[0, :, :32, :32].mean((1, 2)))
    assert output.nothing is None


def test_off_by_default_and_the_network_is_called_on_the_whole_image() -> None:
    network = _LocalNetwork()
    images = torch.rand(1, 3, 40, 40)
    assert not ImageTiling().enabled
    torch.testing.assert_close(ImageTiling().run(network, images)["full"], network(images)["full"])


@pytest.mark.parametrize(
    ("settings", "image_size", "message"),
    [
        ({"tile_size": 128, "stride": 96}, (256, 256), "do not cover a 256 px side exactly"),
        ({"tile_size": 128, "stride": 160}, (256, 256), "larger than tile_size"),
        ({"tile_size": 300}, (256, 256), "exceeds the image size"),
        ({"tile_size": 0}, (256, 256), "positive integer"),
        ({"stride": 64}, (256, 256), "without image_tiling.tile_size"),
    ],
)
def test_tiles_that_cannot_cover_the_image_fail_at_construction_with_one_line(
    settings: dict, image_size: tuple[int, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        TileOutlier(image_size=image_size, image_tiling=settings)


def test_a_stitch_that_does_not_line_up_with_the_network_downsampling_names_the_fix() -> None:
    network = nn.AvgPool2d(8)
    tiling = ImageTiling(tile_size=64, stride=36)  # 36 px is not a multiple of the pooling's 8
    tiling.check((100, 100))
    with pytest.raises(ValueError, match="multiples of the network's downsampling"):
        tiling.run(network, torch.rand(1, 3, 100, 100))


def test_every_local_family_runs_its_network_on_tiles_and_sees_the_whole_image() -> None:
    """64 px tiles of a 128 px image: each model's network is built for (or sees) the tile, its outputs cover the
    whole image."""
    tiling = {"tile_size": 64, "stride": 32}
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        tile_outlier = TileOutlier(image_size=128, image_tiling=tiling).model.eval()
        assert tile_outlier.embed(images).shape[1:3] == tile_outlier.grid.shape == (13, 13)
        fused = Fused(image_size=128, image_tiling=tiling).model.eval()
        tiles, pooled = fused.extract(images)
        assert tiles.shape[:3] == (2, *fused.tiles.grid.shape)
        assert pooled.shape == (2, 304)  # mean and spread of blocks.2 + blocks.4 (40 + 112 channels)
        dfkdm = Dfkdm(image_size=128, image_tiling=tiling).model.eval()
        assert dfkdm.extract_features(images).shape == (2, 9, 472)  # each of the 3 x 3 tiles pooled on its own
        per_tile = torch.stack(
            [
                dfkdm.pooled_features(dfkdm.normalize(images)[..., y : y + 64, x : x + 64])
                for y in (0, 32, 64)
                for x in (0, 32, 64)
            ],
            dim=1,
        )
        torch.testing.assert_close(dfkdm.extract_features(images), per_tile)
        teacher_student = TeacherStudent(image_size=128, image_tiling=tiling).model.eval()
        assert teacher_student.teacher_features(images)[0].shape[-2:] == (32, 32)  # blocks.1 of 128 px: /4
        reconstruction = Reconstruction(image_size=128, image_tiling=tiling).model.eval()
        assert reconstruction.autoencoder.image_size == (64, 64)
        assert reconstruction.reconstruct(images).reconstruction.shape == (2, 3, 128, 128)
