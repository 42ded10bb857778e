"""The Dice datamodule: layouts, class labels through image paths, splits that never test on validation data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from anomalib import TaskType

from anomalib_ext.data import Dice, make_dice_dataset
from anomalib_ext.data.class_folders import class_from_path
from anomalib_ext.data.dice import make_dice_samples, session_from_path


@pytest.fixture(scope="module")
def small_dice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small_dice")
    return make_dice_dataset(
        root,
        image_size=64,
        classes=3,
        n_train_per_class=10,
        n_val_anomalous=6,
        n_test_good_per_class=2,
        n_test_per_defect=2,
        seed=1,
    )


def _paths(dataset) -> set[str]:
    return set(dataset.samples.image_path)


def test_classes_reach_the_model_through_image_paths(small_dice: Path) -> None:
    datamodule = Dice(root=small_dice, train_batch_size=4, eval_batch_size=4, num_workers=0, seed=0)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.image.shape[1:] == (3, 64, 64)
    classes = {class_from_path(path) for path in datamodule.train_data.samples.image_path}
    assert classes == {"00", "01", "02"}
    assert all(class_from_path(path) in classes for path in batch.image_path)


def test_validation_holds_val_anomalies_and_unseen_normals(small_dice: Path) -> None:
    datamodule = Dice(root=small_dice, val_split_ratio=0.2, num_workers=0, seed=0)
    datamodule.setup()
    train, val, test = datamodule.train_data, datamodule.val_data, datamodule.test_data
    assert not _paths(train) & _paths(val)
    assert not _paths(val) & _paths(test)
    val_samples = val.samples
    assert (val_samples.label_index == 1).sum() == 6
    normals = val_samples[val_samples.label_index == 0]
    assert set(normals.class_name) == {"00", "01", "02"}  # stratified: every class validated
    assert len(normals) == 6  # 20% of 10 per class
    assert len(train) == 24
    assert all("/test/" in path for path in test.samples.image_path)
    assert test.task == TaskType.SEGMENTATION  # test anomalies have masks
    assert val.task == TaskType.CLASSIFICATION  # val anomalies do not
    again = Dice(root=small_dice, val_split_ratio=0.2, num_workers=0, seed=0)
    again.setup()
    assert _paths(again.val_data) == _paths(val)  # seeded


def test_without_test_folder_sessions_are_held_out(small_dice: Path, tmp_path: Path) -> None:
    root = tmp_path / "no_test"
    shutil.copytree(small_dice / "train", root / "train")
    shutil.copytree(small_dice / "val", root / "val")
    datamodule = Dice(
        root=root, holdout_sessions=["16_09_21"], holdout_fraction=1.0, test_split_ratio=0.5, num_workers=0, seed=0
    )
    datamodule.setup()
    test = datamodule.test_data.samples
    normals = test[test.label_index == 0]
    assert len(normals) > 0
    assert set(normals.session) == {"16_09_21"}
    assert "16_09_21" not in set(datamodule.train_data.samples.session)
    assert "16_09_21" not in set(datamodule.val_data.samples[datamodule.val_data.samples.label_index == 0].session)
    assert (test.label_index == 1).sum() == 3 and (datamodule.val_data.samples.label_index == 1).sum() == 3
    assert not _paths(datamodule.val_data) & _paths(datamodule.test_data)


def test_flat_train_folder_has_no_classes(tmp_path: Path, small_dice: Path) -> None:
    root = tmp_path / "flat"
    (root / "train" / "good").mkdir(parents=True)
    for path in (small_dice / "train" / "good").rglob("*.png"):
        shutil.copy(path, root / "train" / "good" / path.name)
    shutil.copytree(small_dice / "test", root / "test")
    datamodule = Dice(root=root, num_workers=0, seed=0)  # no val/: synthetic validation from train normals
    datamodule.setup()
    assert {class_from_path(p) for p in datamodule.train_data.samples.image_path} == {None}
    assert datamodule.val_data.has_anomalous


def test_bad_layout_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train/good"):
        make_dice_samples(tmp_path)
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        make_dice_samples(tmp_path)
    with pytest.raises(ValueError, match="val_split_ratio"):
        Dice(root=tmp_path, val_split_ratio=1.5)


def test_session_parsing() -> None:
    assert session_from_path("train/good/07/07_16_09_21_07_016.png") == "16_09_21"
    assert session_from_path("val/anomalous/train_set_img_2595.jpg") == ""


def test_real_dice_splits(real_data: Path) -> None:
    datamodule = Dice(root=real_data / "dice", holdout_fraction=1.0, num_workers=0, seed=0)  # strict cross-session
    tables = datamodule.split_samples()
    assert len(tables["train"]) + len(tables["val"]) + len(tables["test"]) == 6571 + 300
    assert set(tables["test"][tables["test"].label_index == 0].session) == {"16_09_21", "17_11_21"}
    png = tables["test"][tables["test"].label_index == 1].image_path.str.endswith(".png").sum()
    assert png == 28  # half of the 56 PNG anomalies: file type is stratified


def test_real_dice_default_is_the_dice_protocol(real_data: Path) -> None:
    """``Dice()``'s defaults are the one protocol (benchmark and configs): half of the dark sessions' normals."""
    from anomalib_ext.data.dice import HOLDOUT_FRACTION, HOLDOUT_SESSIONS

    assert (HOLDOUT_SESSIONS, HOLDOUT_FRACTION) == (("16_09_21", "17_11_21"), 0.5)
    tables = Dice(root=real_data / "dice", num_workers=0, seed=0).split_samples()
    test = tables["test"]
    assert ((test.label_index == 0).sum(), (test.label_index == 1).sum()) == (745, 150)
    assert set(test[test.label_index == 0].session) == set(HOLDOUT_SESSIONS)
    dark_in_train = tables["train"].session.isin(HOLDOUT_SESSIONS).sum()
    assert dark_in_train > 0  # the other half of those sessions trains: the set's own test split is drawn this way


def test_holdout_fraction_keeps_part_of_the_session_for_training(small_dice: Path, tmp_path: Path) -> None:
    root = tmp_path / "no_test_half"
    shutil.copytree(small_dice / "train", root / "train")
    shutil.copytree(small_dice / "val", root / "val")
    datamodule = Dice(root=root, holdout_sessions=["16_09_21"], holdout_fraction=0.5, num_workers=0, seed=0)
    tables = datamodule.split_samples()
    session_total = int((make_dice_samples(root).session == "16_09_21").sum())
    tested = int((tables["test"].session == "16_09_21").sum())
    kept = int((tables["train"].session == "16_09_21").sum() + (tables["val"].session == "16_09_21").sum())
    assert tested + kept == session_total and 0 < tested < session_total
    with pytest.raises(ValueError, match="holdout_fraction"):
        Dice(root=root, holdout_fraction=0.0)


def _digests(table) -> set[str]:
    from anomalib_ext.data.duplicates import file_digest

    return {file_digest(path) for path in table.image_path}


def test_copies_of_test_images_never_reach_train_or_validation(small_dice: Path, tmp_path: Path) -> None:
    """Like the real set, where 457 images of one dark session are byte-identical copies of the other's."""
    root = tmp_path / "copies"
    shutil.copytree(small_dice / "train", root / "train")
    shutil.copytree(small_dice / "val", root / "val")
    for source in sorted((root / "train" / "good").rglob("*16_09_21*")):
        shutil.copy(source, source.with_name(source.name.replace("16_09_21", "17_11_21")))
    datamodule = Dice(root=root, test_split_ratio=0.5, val_split_ratio=0.3, num_workers=0, seed=0)
    tables = datamodule.split_samples()
    copies = len(list((root / "train" / "good").rglob("*17_11_21*")))
    assert copies > 0
    test = _digests(tables["test"])
    assert not test & _digests(tables["train"])
    assert not test & _digests(tables["val"])
    assert not _digests(tables["val"]) & _digests(tables["train"])


def test_real_dice_stratified_holdout_has_no_copies_across_splits(real_data: Path) -> None:
    datamodule = Dice(
        root=real_data / "dice", holdout_sessions=["16_09_21", "17_11_21"], holdout_fraction=0.5, num_workers=0, seed=0
    )
    tables = datamodule.split_samples()
    test = _digests(tables["test"])
    assert not test & _digests(tables["train"])
    assert not test & _digests(tables["val"])
