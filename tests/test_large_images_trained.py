"""Large images, small defects, for the families trained with gradients: TeacherStudent and Reconstruction.

The same 256 px parts with a dark fleck of 4-6 px as tests/test_large_images.py (its own file so that pytest-xdist
runs these fits beside that file's). Both families score an image by the mean of its map's top fraction; at
``topk_fraction`` 0.001 (65 pixels of a 256 px map, the size of a small defect at the camera's resolution, as in
their ``*_large`` configs) a fleck counts fully. Shrunk four times, as their 128 px configs shrink a 512 px camera
image, each scores some flecked part at or below a normal one; tiled (teacher and student, the autoencoder, on
128 px tiles of the full image), every flecked part above every normal one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from anomalib_ext.models import Reconstruction, TeacherStudent
from tests.harness.flecks import SIZE, TILES, assert_only_tiling_finds_every_fleck, fit, raw_scores
from tests.harness.flecks import test_images as flecked_test_images

SMALL_DEFECT_TOPK = 0.001
SHRUNK = SIZE // 4  # 512 -> 128 px, what configs/{teacher_student/mvtec,reconstruction/ae}.yaml do to a 512 px image

FAMILIES: dict[str, tuple[Callable, int]] = {
    # family: (model for an image size and tiling, epochs: 2 optimiser steps each on 16 training images)
    "teacher_student": (lambda **size: TeacherStudent(topk_fraction=SMALL_DEFECT_TOPK, **size), 25),
    # the autoencoder needs 100 steps to reconstruct the part's edges well below a fleck's residual
    "reconstruction": (lambda **size: Reconstruction(topk_fraction=SMALL_DEFECT_TOPK, **size), 50),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_fleck_the_shrunk_image_loses_is_found_at_full_resolution(
    family: str, flecked_parts: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    build, epochs = FAMILIES[family]
    images, flecked = flecked_test_images(flecked_parts)
    workdir = tmp_path_factory.mktemp(family)
    shrunk, _ = fit(build(image_size=SHRUNK), flecked_parts, workdir / "shrunk", epochs)
    tiled, _ = fit(build(image_size=SIZE, image_tiling=TILES), flecked_parts, workdir / "tiled", epochs)
    assert_only_tiling_finds_every_fleck(
        family, raw_scores(shrunk, images), raw_scores(tiled, images), flecked, shrunk_size=SHRUNK
    )
