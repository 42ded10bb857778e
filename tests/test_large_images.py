"""Large images, small defects: a dark fleck of 4-6 px on a 256 px part, the fit-only families.

Shrinking the image by half, what a 256 px config does to a 512 px camera image, drowns the fleck: the shrunk
model scores some flecked parts below a normal one. The same family with ``image_tiling`` keeps the full
resolution (its network runs on tiles; TileOutlier and Fused stitch the features, Dfkdm pools each tile and scores
the worst) and scores every flecked part above every normal one. The tiled model exports as one graph that takes the
full-size image: OpenVINO's raw scores and maps match torch's. The families trained with gradients:
tests/test_large_images_trained.py. Measured on MVTec AD bottle at 512 px in docs/large_images.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib_ext.models import Dfkdm, Fused, TileOutlier
from tests.harness.flecks import SHRUNK, SIZE, TILES, assert_only_tiling_finds_every_fleck, fit, raw_scores
from tests.harness.flecks import test_images as flecked_test_images

OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}

FAMILIES: dict[str, tuple[Callable, Callable]] = {
    # family: (shrunk model, tiled model), fitted in one epoch
    "tile_outlier": (lambda: TileOutlier(image_size=SHRUNK), lambda: TileOutlier(image_size=SIZE, image_tiling=TILES)),
    "fused": (lambda: Fused(image_size=SHRUNK), lambda: Fused(image_size=SIZE, image_tiling=TILES)),
    "dfkdm": (lambda: Dfkdm(image_size=SHRUNK), lambda: Dfkdm(image_size=SIZE, image_tiling=TILES)),
}

_FITTED: dict[tuple[str, str], tuple] = {}


def _fitted(family: str, variant: str, root: Path, workdir: Path) -> tuple:
    """The family's ``shrunk`` or ``tiled`` model fitted once per test session (the export test reuses the fit)."""
    if (family, variant) not in _FITTED:
        shrunk_model, tiled_model = FAMILIES[family]
        build = shrunk_model if variant == "shrunk" else tiled_model
        _FITTED[family, variant] = fit(build(), root, workdir / f"{family}-{variant}")
    return _FITTED[family, variant]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_fleck_the_shrunk_image_loses_is_found_at_full_resolution(
    family: str, flecked_parts: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    images, flecked = flecked_test_images(flecked_parts)
    workdir = tmp_path_factory.mktemp("fits")
    shrunk, _ = _fitted(family, "shrunk", flecked_parts, workdir)
    tiled, _ = _fitted(family, "tiled", flecked_parts, workdir)
    assert_only_tiling_finds_every_fleck(family, raw_scores(shrunk, images), raw_scores(tiled, images), flecked)


def _export_raw(family: str, root: Path, workdir: Path):  # noqa: ANN202
    """The tiled ``family`` exported to OpenVINO at the full size: its inferencer, the test images and torch's raw
    (unnormalised) outputs on them: clamped scores could hide a broken export."""
    from anomalib.deploy import ExportType, OpenVINOInferencer

    model, engine = _fitted(family, "tiled", root, workdir)
    model.post_processor.enable_normalization = False
    try:
        xml = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=workdir, input_size=(SIZE, SIZE))
        images, _ = flecked_test_images(root)
        with torch.no_grad():
            reference = model(images)
    finally:
        model.post_processor.enable_normalization = True
    return OpenVINOInferencer(path=xml, device="CPU", config=OPENVINO_F32), images, reference


def test_the_tiled_model_exports_at_full_size_and_matches_torch(
    flecked_parts: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """One graph takes the full 256 px image and tiles inside; raw (unnormalised) scores and maps within 1e-3.
    Fused, whose graph holds TileOutlier's whole scoring besides the density (export of the untiled families:
    tests/harness)."""
    inferencer, images, reference = _export_raw("fused", flecked_parts, tmp_path_factory.mktemp("export"))
    for index in range(len(images)):
        result = inferencer.predict(images[index].numpy())
        assert abs(float(np.ravel(result.pred_score)[0]) - float(reference.pred_score[index])) < 1e-3
        exported_map = np.asarray(result.anomaly_map).squeeze()
        assert exported_map.shape == (SIZE, SIZE)
        assert np.abs(exported_map - reference.anomaly_map[index].squeeze().numpy()).max() < 1e-3


def test_tiled_dfkdm_exports_at_full_size_and_matches_torch(
    flecked_parts: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Dfkdm's per-tile vectors and worst-tile score are in the graph too. Its raw scores are negative log densities
    in the hundreds: they must agree to 1e-5 of their size (1e-3 of a score near 100)."""
    inferencer, images, outputs = _export_raw("dfkdm", flecked_parts, tmp_path_factory.mktemp("export-dfkdm"))
    reference = outputs.pred_score.flatten().numpy()
    exported = np.array([float(np.ravel(inferencer.predict(image.numpy()).pred_score)[0]) for image in images])
    assert (np.abs(exported - reference) < 1e-5 * np.maximum(100.0, np.abs(reference))).all(), (exported, reference)
