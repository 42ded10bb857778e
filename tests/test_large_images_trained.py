"""Large images, small defects, for the families trained with gradients: TeacherStudent here, Reconstruction in
tests/test_large_images_autoencoder.py.

The same 256 px parts with a dark fleck of 4-6 px as tests/test_large_images.py (each family in its own file so that
pytest-xdist, which gives a worker whole files, runs these fits beside each other and beside that file's). Both
families score an image by the mean of its map's top fraction; at ``topk_fraction`` 0.001 (65 pixels of a 256 px map,
the size of a small defect at the camera's resolution, as in their ``*_large`` configs) a fleck counts fully. Shrunk
four times, as their 128 px configs shrink a 512 px camera image, each scores some flecked part at or below a normal
one; tiled (teacher and student, the autoencoder, on 128 px tiles of the full image), every flecked part above every
normal one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalib_ext.models import TeacherStudent
from tests.harness.flecks import GRADIENT_SHRUNK, SMALL_DEFECT_TOPK, assert_shrunk_misses_and_tiled_finds


def test_a_fleck_the_shrunk_image_loses_is_found_at_full_resolution(
    flecked_parts: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """TeacherStudent, 7 epochs of 8 steps on 16 training images (56 steps, past the family's 50-step floor)."""
    assert_shrunk_misses_and_tiled_finds(
        "teacher_student",
        lambda **size: TeacherStudent(topk_fraction=SMALL_DEFECT_TOPK, **size),
        7,
        flecked_parts,
        tmp_path_factory.mktemp("teacher_student"),
        GRADIENT_SHRUNK,
    )
