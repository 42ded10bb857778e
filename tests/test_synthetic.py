"""Synthetic datasets: deterministic, in the layouts anomalib and our datamodules read."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from anomalib_ext.data.synthetic import DICE_DEFECTS, MVTEC_DEFECTS, make_dice_dataset, make_mvtec_dataset


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    kwargs = {"image_size": 64, "n_train": 4, "n_test_good": 2, "n_test_per_defect": 1}
    first = make_mvtec_dataset(tmp_path / "a", seed=3, **kwargs)
    second = make_mvtec_dataset(tmp_path / "b", seed=3, **kwargs)
    third = make_mvtec_dataset(tmp_path / "c", seed=4, **kwargs)
    assert _digest(first) == _digest(second)
    assert _digest(first) != _digest(third)


def test_mvtec_layout_masks_match_defects(tmp_path: Path) -> None:
    root = make_mvtec_dataset(tmp_path, image_size=96, n_train=5, n_test_good=3, n_test_per_defect=2)
    assert len(list((root / "train" / "good").glob("*.png"))) == 5
    for defect in MVTEC_DEFECTS:
        for image_path in sorted((root / "test" / defect).glob("*.png")):
            mask = cv2.imread(str(root / "ground_truth" / defect / f"{image_path.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
            assert mask.shape == (96, 96)
            assert set(np.unique(mask)) <= {0, 255}
            assert (mask > 0).sum() > 10, f"{defect} mask is (almost) empty"


def test_planted_defect_changes_pixels_inside_its_mask(tmp_path: Path) -> None:
    root = make_mvtec_dataset(tmp_path, image_size=128, n_train=8, n_test_good=0, n_test_per_defect=1)
    normal_mean = np.mean([cv2.imread(str(p)).astype(float) for p in (root / "train" / "good").glob("*.png")], axis=0)
    for defect in MVTEC_DEFECTS:
        image = cv2.imread(str(root / "test" / defect / "000.png")).astype(float)
        mask = cv2.imread(str(root / "ground_truth" / defect / "000_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
        inside = np.abs(image - normal_mean)[mask].mean()
        outside = np.abs(image - normal_mean)[~mask].mean()
        assert inside > 2 * outside, f"{defect}: planted defect not distinct ({inside:.1f} vs {outside:.1f})"


def test_anomalib_reads_the_mvtec_layout(tmp_path: Path) -> None:
    from anomalib.data import Folder, MVTecAD

    make_mvtec_dataset(tmp_path, category="synthetic", image_size=64, n_train=6, n_test_good=2, n_test_per_defect=1)
    datamodule = MVTecAD(root=tmp_path, category="synthetic", num_workers=0, train_batch_size=2, eval_batch_size=2)
    datamodule.setup()
    assert len(datamodule.train_data) == 6
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.gt_mask is not None
    folder = Folder(
        name="synthetic",
        root=tmp_path / "synthetic",
        normal_dir="train/good",
        abnormal_dir="test/spot",
        mask_dir="ground_truth/spot",
        num_workers=0,
    )
    folder.setup()
    assert len(folder.train_data) > 0


def test_dice_layout_mirrors_the_real_set(tmp_path: Path) -> None:
    root = make_dice_dataset(tmp_path, image_size=128, n_train_per_class=4, n_val_anomalous=6, n_test_per_defect=2)
    classes = sorted(p.name for p in (root / "train" / "good").iterdir())
    assert classes == [f"{index:02d}" for index in range(11)]
    image = cv2.imread(str(next((root / "train" / "good" / "07").glob("*.png"))), cv2.IMREAD_UNCHANGED)
    assert image.shape == (128, 128), "dice images are single-channel like the Faktion set"
    assert len(list((root / "val" / "anomalous").glob("*.png"))) == 6
    for defect in DICE_DEFECTS:
        assert len(list((root / "test" / defect).glob("*.png"))) == 2
    # the early sessions are darker, as in the real data
    dark = [cv2.imread(str(p), 0).mean() for p in (root / "train" / "good").rglob("*16_09_21*.png")]
    bright = [cv2.imread(str(p), 0).mean() for p in (root / "train" / "good").rglob("*26_01_22*.png")]
    assert np.mean(bright) - np.mean(dark) > 5
