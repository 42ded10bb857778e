"""Large images, small defects, for Reconstruction (what tests/test_large_images_trained.py checks for
TeacherStudent, in its own file so that pytest-xdist runs the two longest fits of the suite on different workers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalib_ext.models import Reconstruction
from tests.harness.flecks import GRADIENT_SHRUNK, SMALL_DEFECT_TOPK, assert_shrunk_misses_and_tiled_finds


def test_a_fleck_the_shrunk_image_loses_is_found_at_full_resolution_by_the_autoencoder(
    flecked_parts: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Reconstruction, 13 epochs of 8 steps: the autoencoder needs about 100 steps to reconstruct the part's edges
    well below a fleck's residual."""
    assert_shrunk_misses_and_tiled_finds(
        "reconstruction",
        lambda **size: Reconstruction(topk_fraction=SMALL_DEFECT_TOPK, **size),
        13,
        flecked_parts,
        tmp_path_factory.mktemp("reconstruction"),
        GRADIENT_SHRUNK,
    )
