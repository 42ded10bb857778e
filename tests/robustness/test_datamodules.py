"""Bad files against the datamodules: anomalib's MVTecAD and Folder (through ``checked_datamodule``) and our Dice."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_ext.data.datamodule_checks import checked_datamodule
from anomalib_ext.data.validation import DataValidationError, read_rgb
from tests.robustness.files import BAD_FILES, rgb_pattern, write_gray16, write_modes, write_png

LOADER_ARGS = {"train_batch_size": 4, "eval_batch_size": 4, "num_workers": 0}


@pytest.fixture(scope="module")
def small_mvtec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    root = tmp_path_factory.mktemp("small_mvtec")
    make_mvtec_dataset(root, category="synthetic", image_size=32, n_train=4, n_test_good=2, n_test_per_defect=1)
    return root


@pytest.fixture(scope="module")
def small_dice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from anomalib_ext.data.synthetic import make_dice_dataset

    root = tmp_path_factory.mktemp("small_dice")
    make_dice_dataset(root, image_size=32, n_train_per_class=2, n_test_good_per_class=1, n_test_per_defect=1)
    return root


def _copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(source, target)
    return target


def _mvtec(root: Path):
    from anomalib.data import MVTecAD

    return MVTecAD(root=root, category="synthetic", **LOADER_ARGS)


def _dice(root: Path):
    from anomalib_ext.data import Dice

    return Dice(root=root, seed=0, **LOADER_ARGS)


def _load_everything(datamodule) -> list:
    datamodule.setup()
    loaders = [datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()]
    return [batch for loader in loaders for batch in loader]


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_checked_mvtec_names_bad_train_file_before_loading(small_mvtec: Path, tmp_path: Path, kind: str) -> None:
    root = _copy(small_mvtec, tmp_path)
    bad = BAD_FILES[kind][0](root / "synthetic" / "train" / "good" / "zz_bad")
    with pytest.raises(DataValidationError) as caught:
        checked_datamodule(_mvtec(root))
    assert str(bad) in str(caught.value)


@pytest.mark.parametrize("problem", ["wrong_size", "missing", "not_binary"])
def test_checked_mvtec_names_bad_mask(small_mvtec: Path, tmp_path: Path, problem: str) -> None:
    root = _copy(small_mvtec, tmp_path)
    mask = sorted((root / "synthetic" / "ground_truth").rglob("*_mask.png"))[0]
    if problem == "wrong_size":
        Image.new("L", (16, 16), 255).save(mask)
    elif problem == "missing":
        mask.unlink()
    else:
        Image.fromarray(np.linspace(0, 255, 32 * 32).reshape(32, 32).astype(np.uint8)).save(mask)
    with pytest.raises(DataValidationError) as caught:
        checked_datamodule(_mvtec(root))
    assert str(mask) in str(caught.value) or mask.stem.removesuffix("_mask") in str(caught.value)


def test_checked_mvtec_empty_train_good(small_mvtec: Path, tmp_path: Path) -> None:
    root = _copy(small_mvtec, tmp_path)
    for path in (root / "synthetic" / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(DataValidationError, match="train/good folder holds no images"):
        checked_datamodule(_mvtec(root))


def test_checked_folder_datamodule(small_mvtec: Path, tmp_path: Path) -> None:
    from anomalib.data import Folder

    root = _copy(small_mvtec, tmp_path) / "synthetic"
    datamodule = Folder(name="f", root=root, normal_dir="train/good", abnormal_dir="test/spot", **LOADER_ARGS)
    assert checked_datamodule(datamodule) is datamodule
    bad = BAD_FILES["truncated_jpeg"][0](root / "test" / "spot" / "zz")
    with pytest.raises(DataValidationError, match="truncated") as caught:
        checked_datamodule(Folder(name="f", root=root, normal_dir="train/good", abnormal_dir="test/spot"))
    assert str(bad) in str(caught.value)


def test_mixed_modes_and_sizes_load_as_consistent_rgb(small_mvtec: Path, tmp_path: Path) -> None:
    """Gray/RGBA/palette/LA/16-bit RGB/JPEG/BMP and odd sizes among RGB training images: 3 channels, same pixels."""
    root = _copy(small_mvtec, tmp_path)
    good = root / "synthetic" / "train" / "good"
    paths = write_modes(good / "modes", rgb_pattern(32, seed=3))
    for path in paths.values():
        path.rename(good / f"mode_{path.name.replace('.', '_')}{path.suffix}")
    shutil.rmtree(good / "modes")
    write_png(good / "odd_size.png", rgb_pattern(20, seed=4))
    datamodule = checked_datamodule(_mvtec(root))
    datamodule.setup()
    for batch in datamodule.train_dataloader():
        assert batch.image.shape[1] == 3
        assert torch.isfinite(batch.image).all()
        for image, path in zip(batch.image, batch.image_path, strict=True):
            if Path(path).name.startswith("mode_") and image.shape[-1] == 32:
                expected = torch.from_numpy(read_rgb(path)).permute(2, 0, 1).float() / 255
                torch.testing.assert_close(image, expected, atol=1 / 255 + 1e-6, rtol=0)


def test_16bit_gray_training_image_is_rejected_before_it_saturates(small_mvtec: Path, tmp_path: Path) -> None:
    root = _copy(small_mvtec, tmp_path)
    path = write_gray16(root / "synthetic" / "train" / "good" / "gray16.png", np.full((32, 32), 100, np.uint8))
    with pytest.raises(DataValidationError, match="16-bit") as caught:
        checked_datamodule(_mvtec(root))
    assert str(path) in str(caught.value)


# --- our Dice datamodule -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_checked_dice_names_bad_file(small_dice: Path, tmp_path: Path, kind: str) -> None:
    root = _copy(small_dice, tmp_path)
    folder = next(p for p in sorted((root / "train" / "good").iterdir()) if p.is_dir())
    bad = BAD_FILES[kind][0](folder / "zz_bad")
    with pytest.raises(DataValidationError) as caught:
        checked_datamodule(_dice(root))
    assert str(bad) in str(caught.value)


# Dice without the wrapper: the file must be named. Unsupported extensions are skipped (not data to Dice).
@pytest.mark.parametrize("kind", sorted(set(BAD_FILES) - {"unsupported_extension"}))
def test_dice_itself_names_bad_file(small_dice: Path, tmp_path: Path, kind: str) -> None:
    root = _copy(small_dice, tmp_path)
    folder = next(p for p in sorted((root / "train" / "good").iterdir()) if p.is_dir())
    bad = BAD_FILES[kind][0](folder / "zz_bad")
    with pytest.raises(Exception) as caught:  # noqa: PT011 - any error type, as long as it names the file
        _load_everything(_dice(root))
    assert str(bad) in str(caught.value)


def test_dice_empty_or_missing_train_good(small_dice: Path, tmp_path: Path) -> None:
    root = _copy(small_dice, tmp_path)
    shutil.rmtree(root / "train" / "good")
    with pytest.raises((FileNotFoundError, DataValidationError), match="train/good"):
        _dice(root).setup()
    (root / "train" / "good" / "00").mkdir(parents=True)
    with pytest.raises((FileNotFoundError, DataValidationError), match="no images|no usable image"):
        _dice(root).setup()


def test_dice_mixed_modes_load_as_rgb(small_dice: Path, tmp_path: Path) -> None:
    root = _copy(small_dice, tmp_path)
    folder = next(p for p in sorted((root / "train" / "good").iterdir()) if p.is_dir())
    for name, path in write_modes(tmp_path / "modes", rgb_pattern(32, seed=5)).items():
        shutil.move(path, folder / f"mode_{name}{path.suffix}")
    datamodule = checked_datamodule(_dice(root))
    datamodule.setup()
    seen = 0
    for batch in datamodule.train_dataloader():
        assert batch.image.shape[1] == 3
        for image, path in zip(batch.image, batch.image_path, strict=True):
            if Path(path).name.startswith("mode_"):
                seen += 1
                expected = torch.from_numpy(read_rgb(path)).permute(2, 0, 1).float() / 255
                torch.testing.assert_close(image, expected, atol=1 / 255 + 1e-6, rtol=0)
    assert seen > 0  # some went to the held-out split, the rest were read


def test_check_data_callback_checks_before_loading(small_mvtec: Path, tmp_path: Path) -> None:
    """``trainer.callbacks: [anomalib_ext.data.datamodule_checks.CheckData]`` in a config: the bad file is named at
    setup."""
    from types import SimpleNamespace

    from lightning.pytorch import Callback

    from anomalib_ext.data.datamodule_checks import CheckData

    assert issubclass(CheckData, Callback)
    root = _copy(small_mvtec, tmp_path)
    CheckData().setup(SimpleNamespace(datamodule=_mvtec(root)), None, "fit")
    bad = BAD_FILES["truncated_png"][0](root / "synthetic" / "train" / "good" / "zz_bad")
    with pytest.raises(DataValidationError) as caught:
        CheckData().setup(SimpleNamespace(datamodule=_mvtec(root)), None, "fit")
    assert str(bad) in str(caught.value)
