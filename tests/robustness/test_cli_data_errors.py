"""A bad file in the training data stops ``anomalib train`` / ``anomalib-ext train`` with one line and status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tile_outlier" / "mvtec.yaml"


@pytest.fixture(scope="module")
def mvtec_with_zero_byte_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    root = tmp_path_factory.mktemp("bad_mvtec")
    base = make_mvtec_dataset(root, category="bad", image_size=64, n_train=6, n_test_good=2, n_test_per_defect=1)
    (base / "train" / "good" / "broken.png").write_bytes(b"")
    return root


@pytest.mark.parametrize("entry_point", ["anomalib", "anomalib-ext"])
def test_zero_byte_training_image_exits_2_naming_the_file(
    tmp_path: Path, mvtec_with_zero_byte_file: Path, entry_point: str
) -> None:
    command = [
        str(Path(sys.executable).parent / entry_point),
        "train",
        "--config",
        str(CONFIG),
        "--data.init_args.root",
        str(mvtec_with_zero_byte_file),
        "--data.init_args.category",
        "bad",
        "--data.init_args.num_workers",
        "0",
        "--model.init_args.image_size",
        "64",
        "--default_root_dir",
        str(tmp_path / "run"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)  # noqa: S603
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    broken = mvtec_with_zero_byte_file / "bad" / "train" / "good" / "broken.png"
    assert f"error: {broken}: empty file (0 bytes)" in result.stderr, output[-3000:]
    assert "Traceback" not in output and "╭" not in output, output[-3000:]  # neither Python's nor rich's


def test_check_data_false_skips_the_check(mvtec_with_zero_byte_file: Path) -> None:
    """The check is one argument away; skipped, the datamodule meets the bad file itself (anomalib's error)."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    from anomalib_ext.models import TileOutlier

    model = TileOutlier(image_size=64, check_data=False)
    datamodule = MVTecAD(root=mvtec_with_zero_byte_file, category="bad", num_workers=0)
    engine = Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, max_epochs=1)
    with pytest.raises(Exception) as caught:  # noqa: PT011  (whatever anomalib/PIL raise: not our exit)
        engine.fit(model=model, datamodule=datamodule)
    assert not isinstance(caught.value, SystemExit)
    assert "broken.png" in str(caught.value)  # anomalib met the file itself (the fit did not fail for another reason)
