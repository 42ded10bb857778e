"""``anomalib_ext.data.validation``: every bad file is named with its problem; readable modes convert alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_ext.data.validation import (
    DataValidationError,
    check_dice_layout,
    check_image_file,
    check_image_folder,
    check_mask,
    check_mvtec_layout,
    read_rgb,
)
from tests.robustness.files import BAD_FILES, rgb_pattern, write_gray16, write_modes, write_png
from tests.robustness.tools import load_tool


def _load_infer_openvino():
    """The edge tool as a module (it lives in tools/, not in the package)."""
    return load_tool("infer_openvino")


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_is_named_with_its_problem(tmp_path: Path, kind: str) -> None:
    writer, words = BAD_FILES[kind]
    path = writer(tmp_path / "bad")
    with pytest.raises(DataValidationError) as caught:
        check_image_file(path)
    message = str(caught.value)
    assert str(path) in message
    assert any(word in message for word in words), message
    assert caught.value.problems == [(path, caught.value.problems[0][1])]


def test_folder_check_lists_every_bad_file_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "good"
    write_png(folder / "ok.png", rgb_pattern())
    bad = [writer(folder / f"bad_{kind}") for kind, (writer, _) in sorted(BAD_FILES.items())]
    (folder / ".DS_Store").write_bytes(b"\x00junk")  # hidden files are not data
    with pytest.raises(DataValidationError) as caught:
        check_image_folder(folder)
    reported = {path for path, _ in caught.value.problems}
    assert reported == set(bad)
    assert f"{len(bad)} problems" in str(caught.value)


def test_folder_check_returns_good_images(tmp_path: Path) -> None:
    paths = write_modes(tmp_path / "modes", rgb_pattern(24))
    infos = check_image_folder(tmp_path / "modes")
    assert {info.path for info in infos} == set(paths.values())


@pytest.mark.parametrize("setup", ["missing", "empty", "only_unsupported", "is_a_file"])
def test_missing_or_empty_folder(tmp_path: Path, setup: str) -> None:
    folder = tmp_path / "train" / "good"
    if setup != "missing":
        folder.parent.mkdir(parents=True)
    if setup in {"empty", "only_unsupported"}:
        folder.mkdir()
    if setup == "only_unsupported":
        (folder / "notes.txt").write_text("x")
    if setup == "is_a_file":
        folder.write_text("x")
    with pytest.raises(DataValidationError) as caught:
        check_image_folder(folder, role="train/good")
    message = str(caught.value)
    assert str(folder) in message
    assert "train/good" in message


def test_too_small_image_is_reported_with_both_sizes(tmp_path: Path) -> None:
    path = write_png(tmp_path / "tiny.png", rgb_pattern(8))
    with pytest.raises(DataValidationError, match=r"8x8.*smaller than the required 16x16"):
        check_image_file(path, min_size=16)
    assert check_image_file(path, min_size=8).width == 8


def test_very_large_image_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib_ext.data.validation import files

    path = write_png(tmp_path / "large.png", np.zeros((300, 400, 3), np.uint8))
    monkeypatch.setattr(files, "MAX_PIXELS", 100_000)
    with pytest.raises(DataValidationError, match="too large"):
        check_image_file(path)


def test_modes_convert_like_anomalib_and_like_the_edge_tool(tmp_path: Path) -> None:
    """Gray, RGBA, LA, palette, 16-bit RGB, JPEG, BMP: our reader, anomalib's and the OpenVINO tool's agree."""
    from anomalib.data.utils import read_image

    infer_openvino = _load_infer_openvino()
    for name, path in write_modes(tmp_path, rgb_pattern(24)).items():
        ours = read_rgb(path)
        assert ours.shape == (24, 24, 3) and ours.dtype == np.uint8, name
        anomalib_rgb = np.rint(read_image(path) * 255).astype(np.uint8)
        np.testing.assert_array_equal(ours, anomalib_rgb, err_msg=f"{name}: differs from anomalib's read_image")
        np.testing.assert_array_equal(ours, infer_openvino.read_rgb(path), err_msg=f"{name}: differs from OpenCV")


def test_16bit_grayscale_is_flagged_because_anomalib_saturates_it(tmp_path: Path) -> None:
    from anomalib.data.utils import read_image

    gray8 = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (8, 1))
    path = write_gray16(tmp_path / "gray16.png", gray8)
    with pytest.raises(DataValidationError, match="16-bit"):
        check_image_file(path)
    ours = read_rgb(path)  # scaled, like OpenCV on the edge
    np.testing.assert_array_equal(ours[..., 0], gray8)
    np.testing.assert_array_equal(ours, _load_infer_openvino().read_rgb(path))
    # the reason for the check: anomalib clips 16-bit values at 255
    assert (read_image(path)[..., 0] == 1.0).mean() > 0.9


def test_mask_checks(tmp_path: Path) -> None:
    good = write_png(tmp_path / "good_mask.png", np.where(np.eye(16, dtype=bool), 255, 0).astype(np.uint8))
    check_mask(good, (16, 16))
    with pytest.raises(DataValidationError, match=r"mask is 16x16 \(HxW\) but its image is 32x32"):
        check_mask(good, (32, 32))
    soft = write_png(tmp_path / "soft_mask.png", np.arange(256, dtype=np.uint8).reshape(16, 16))
    with pytest.raises(DataValidationError, match="not binary"):
        check_mask(soft, (16, 16))
    with pytest.raises(DataValidationError, match="mask file not found"):
        check_mask(tmp_path / "absent_mask.png", (16, 16))
    ones = write_png(tmp_path / "ones_mask.png", np.eye(16, dtype=np.uint8))  # 0/1 masks are binary too
    check_mask(ones, (16, 16))


def _small_mvtec(root: Path) -> Path:
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    make_mvtec_dataset(root, category="synthetic", image_size=32, n_train=3, n_test_good=2, n_test_per_defect=1)
    return root / "synthetic"


def test_synthetic_mvtec_layout_passes(tmp_path: Path) -> None:
    _small_mvtec(tmp_path)
    check_mvtec_layout(tmp_path, "synthetic")


def test_mvtec_layout_problems_are_all_listed(tmp_path: Path) -> None:
    base = _small_mvtec(tmp_path)
    masks = sorted((base / "ground_truth").rglob("*_mask.png"))
    masks[0].unlink()  # missing mask
    Image.new("L", (8, 8), 255).save(masks[1])  # wrong size
    Image.fromarray(np.arange(32 * 32, dtype=np.uint32).reshape(32, 32).astype(np.uint8)).save(masks[2])  # not binary
    BAD_FILES["zero_byte"][0](base / "train" / "good" / "zz")
    shutil.copy(next((base / "train" / "good").glob("0*.png")), base / "train" / "good" / "upper.PNG")
    with pytest.raises(DataValidationError) as caught:
        check_mvtec_layout(tmp_path, "synthetic")
    message = str(caught.value)
    assert "anomalous image has no mask" in message and str(masks[0]) in message
    assert "but its image is 32x32" in message and str(masks[1]) in message
    assert "not binary" in message and str(masks[2]) in message
    assert "empty file" in message
    assert "upper-case extension" in message


def test_mvtec_test_set_without_anomalies_or_normals(tmp_path: Path) -> None:
    base = _small_mvtec(tmp_path)
    for folder in (base / "test").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)
    with pytest.raises(DataValidationError, match="no anomalous images"):
        check_mvtec_layout(tmp_path, "synthetic")
    # masks left without their images: anomalib fails with "Must have equal len keys and value"
    with pytest.raises(DataValidationError, match="mask files for 0 anomalous test images"):
        check_mvtec_layout(tmp_path, "synthetic", require_anomalies=False)
    shutil.rmtree(base / "ground_truth")
    check_mvtec_layout(tmp_path, "synthetic", require_anomalies=False)
    shutil.rmtree(base / "test" / "good")
    with pytest.raises(DataValidationError, match="no normal images"):
        check_mvtec_layout(tmp_path, "synthetic", require_anomalies=False)


def test_mvtec_missing_category_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="category folder not found"):
        check_mvtec_layout(tmp_path, "bottel")


def test_dice_layout(tmp_path: Path) -> None:
    from anomalib_ext.data.synthetic import make_dice_dataset

    make_dice_dataset(tmp_path, image_size=32, n_train_per_class=1, n_test_good_per_class=1, n_test_per_defect=1)
    check_dice_layout(tmp_path)
    victim = next((tmp_path / "train" / "good").rglob("*.png"))
    BAD_FILES["truncated_png"][0](victim.with_name("zz_bad"))
    with pytest.raises(DataValidationError, match="truncated"):
        check_dice_layout(tmp_path)


def test_real_data_passes(real_data: Path) -> None:
    check_mvtec_layout(real_data / "mvtec_ad", "bottle")
    check_image_folder(real_data / "dice" / "val", role="dice val")


def test_command_line_reports_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anomalib_ext.data.validation.__main__ import main

    folder = tmp_path / "images"
    folder.mkdir()
    BAD_FILES["text_as_png"][0](folder / "readme")
    assert main([str(folder)]) == 2
    assert "not an image" in capsys.readouterr().err
    write_png(tmp_path / "ok" / "a.png", rgb_pattern())
    assert main([str(tmp_path / "ok")]) == 0


def _numbered_anomalies(root: Path, category: str, width: int) -> Path:
    """A dataset whose 11 ``scratch`` images and masks are ``anomaly-<n>`` (zero-padded to ``width`` digits)."""
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    base = make_mvtec_dataset(
        root, category=category, image_size=32, n_train=3, n_test_good=2, n_test_per_defect=11, defects=("scratch",)
    )
    images = sorted((base / "test" / "scratch").glob("*.png"))
    masks = sorted((base / "ground_truth" / "scratch").glob("*_mask.png"))
    assert len(images) == len(masks) == 11
    for number, (image, mask) in enumerate(zip(images, masks, strict=True), start=1):
        image.rename(image.with_name(f"anomaly-{number:0{width}d}.png"))
        mask.rename(mask.with_name(f"anomaly-{number:0{width}d}_mask.png"))
    return base


def test_masks_paired_by_sort_order_are_caught_before_anomalib(tmp_path: Path) -> None:
    """Every mask has its image's name, yet anomalib pairs by sorted order: ``anomaly-10`` breaks it."""
    from anomalib.data import MVTecAD
    from anomalib.data.errors import MisMatchError

    base = _numbered_anomalies(tmp_path, "unpadded", width=1)
    with pytest.raises(MisMatchError):  # what the user meets without the check
        MVTecAD(root=tmp_path, category="unpadded", num_workers=0).setup()
    with pytest.raises(DataValidationError) as caught:
        check_mvtec_layout(tmp_path, "unpadded")
    message = str(caught.value)
    assert "sorted file-name order" in message and "zero-padded" in message
    # sorted, anomaly-10 comes second among the images but anomaly-11_mask second among the masks
    assert str(base / "test" / "scratch" / "anomaly-10.png") in message


def test_zero_padded_numbers_pass_the_pairing_check(tmp_path: Path) -> None:
    from anomalib.data import MVTecAD

    _numbered_anomalies(tmp_path, "padded", width=2)
    check_mvtec_layout(tmp_path, "padded")
    MVTecAD(root=tmp_path, category="padded", num_workers=0).setup()
