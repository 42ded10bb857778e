"""tools/fastdup_tiles.py (the tile audit) and TileOutlier's optional fastdup backend."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import fastdup_tiles  # noqa: E402  (a script in tools/, not a package)


def _fastdup_installed() -> bool:
    return importlib.util.find_spec("fastdup") is not None


needs_fastdup = pytest.mark.skipif(not _fastdup_installed(), reason="optional fastdup is not installed")


@pytest.fixture(scope="module")
def audit_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """Eight normal synthetic bottles, three with a planted defect, and one corrupt file."""
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    root = tmp_path_factory.mktemp("audit_src")
    category = make_mvtec_dataset(
        root,
        image_size=128,
        n_train=8,
        n_test_good=0,
        n_test_per_defect=1,
        defects=("spot", "missing", "colour"),
        seed=5,
    )
    folder = tmp_path_factory.mktemp("audit_in")
    masks: dict[str, np.ndarray] = {}
    for path in sorted((category / "train" / "good").glob("*.png")):
        (folder / f"good_{path.name}").write_bytes(path.read_bytes())
    for path in sorted(category.glob("test/*/*.png")):
        name = f"defect_{path.parent.name}_{path.name}"
        (folder / name).write_bytes(path.read_bytes())
        masks[name] = cv2.imread(str(category / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"), 0) > 0
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return folder, masks


def _check_audit(folder: Path, masks: dict[str, np.ndarray], out: Path, backend: str) -> None:
    tiles = fastdup_tiles.audit(folder, out, num_parts=4, backend=backend, outlier_fraction=0.03)
    skipped = (out / "skipped.txt").read_text()
    assert "broken.png" in skipped
    assert len(tiles) == 11 * 16  # 11 readable images x 16 tiles
    with (out / "tile_scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(tiles)
    assert {"image", "row", "col", "y0", "x0", "y1", "x1", "score", "outlier"} <= set(rows[0])
    assert len(list((out / "outlined").glob("*.png"))) == 11
    assert cv2.imread(str(out / "contact_sheet.png")) is not None
    # the worst tiles are on the planted defects
    worst = sorted(tiles, key=lambda tile: tile.score, reverse=True)[:3]
    for tile in worst:
        mask = masks.get(tile.image.name)
        assert mask is not None, f"top tile from a normal image: {tile.image.name} ({tile.score:.3f})"
        y0, x0, y1, x1 = tile.box
        assert mask[y0:y1, x0:x1].any(), f"top tile of {tile.image.name} misses its defect"


def test_audit_with_torch_backend_skips_the_corrupt_file_and_finds_the_defects(audit_folder, tmp_path: Path) -> None:
    folder, masks = audit_folder
    _check_audit(folder, masks, tmp_path / "out", backend="torch")


@needs_fastdup
def test_audit_with_fastdup_backend(audit_folder, tmp_path: Path) -> None:
    folder, masks = audit_folder
    _check_audit(folder, masks, tmp_path / "out", backend="fastdup")


def test_audit_rejects_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not exist"):
        fastdup_tiles.audit(tmp_path / "nowhere", tmp_path / "out")


@needs_fastdup
def test_tile_outlier_fastdup_backend_trains_scores_and_refuses_export(mvtec_root: Path, tmp_path: Path) -> None:
    from anomalib.data import MVTecAD
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from sklearn.metrics import roc_auc_score

    from anomalib_ext.models import TileOutlier

    tiling = {"num_parts": 4, "tile_size": None, "stride": None}
    model = TileOutlier(image_size=128, tiling=tiling, backend="fastdup", visualizer=False)
    datamodule = MVTecAD(
        root=mvtec_root, category="synthetic", train_batch_size=32, eval_batch_size=32, num_workers=0, seed=0
    )
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, devices=1, accelerator="cpu")
    engine.fit(model=model, datamodule=datamodule)
    predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    scores = torch.cat([batch.pred_score.flatten() for batch in predictions]).numpy()
    labels = torch.cat([batch.gt_label.flatten() for batch in predictions]).numpy()
    maps = torch.cat([batch.anomaly_map for batch in predictions])
    assert maps.shape[-2:] == (128, 128)
    assert roc_auc_score(labels, scores) >= 0.8
    with pytest.raises(NotImplementedError, match="fastdup"):
        engine.export(model, ExportType.OPENVINO, export_root=tmp_path / "export", input_size=(128, 128))
