"""Quiet logs by default (``anomalib_ext.quiet``): a training through ``anomalib-ext train`` prints no FutureWarning,
no log line twice and none of timm's messages about our offline weights; ``--verbose`` brings the warnings back;
an INT8 export without ``--data`` stops at once with one line naming the flag; the INT8 size warning counts images.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from anomalib_ext.cli import shipped_configs
from anomalib_ext.models.components.quantization import calibration_note

BIN = Path(sys.executable).parent
# anomalib's console format: "2026-12-06 06:18:27,554 - logger.name - INFO - message"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - (?P<name>\S+) - (?P<level>[A-Z]+) - (?P<message>.*)$")
# the Rich handler anomalib adds next to it: "[12/06/26 06:06:51] INFO     Initializing ..."
RICH_LINE = re.compile(r"^(\[\d\d/\d\d/\d\d \d\d:\d\d:\d\d\])?\s+(INFO|WARNING|ERROR)\s{2,}")


def _run(arguments: list[str], cwd: Path, env_changes: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "ANOMALIB_EXT_VERBOSE"}
    env.update(env_changes or {})
    return subprocess.run(  # noqa: S603
        [str(BIN / "anomalib-ext"), *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=1800,
        check=False,
    )


@pytest.fixture(scope="module")
def training(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    """One epoch of TileOutlier (fit-only, pretrained backbone) on the small synthetic set, at 64 px."""
    work = tmp_path_factory.mktemp("quiet_train")
    return _run(
        [
            "train",
            "--config",
            str(shipped_configs()["tile_outlier/mvtec"]),
            "--data.init_args.root",
            str(mvtec_root),
            "--data.init_args.category",
            "synthetic",
            "--model.init_args.image_size",
            "64",
            "--trainer.max_epochs",
            "1",
        ],
        work,
    )


def test_training_prints_no_future_warning_nor_offline_weight_noise(training: subprocess.CompletedProcess) -> None:
    output = training.stdout + training.stderr
    assert training.returncode == 0, output[-3000:]
    assert "FutureWarning" not in output
    assert "Loading pretrained weights from Hugging Face hub" not in output
    assert "Unexpected keys" not in output
    assert "configure_optimizers` returned `None`" not in output
    assert "TileOutlier: fitting the bank" in output  # our own INFO lines still show
    assert "image_AUROC" in output  # and the test table


def test_every_log_record_prints_once(training: subprocess.CompletedProcess) -> None:
    lines = (training.stdout + training.stderr).splitlines()
    records = [match for line in lines if (match := LOG_LINE.match(line))]
    assert len(records) >= 3, lines  # noqa: PLR2004  (anomalib's and ours: initialising, callbacks, fitting, timing)
    assert not [line for line in lines if RICH_LINE.match(line)], "a second (Rich) handler printed records again"
    messages = [record.group("message") for record in records]
    assert messages.count("Initializing TileOutlier model.") == 1
    for line, following in zip(lines, lines[1:], strict=False):
        assert line.strip() == "" or line != following, f"line printed twice in a row: {line}"
        match = LOG_LINE.match(line)
        if match and match.group("message"):
            assert match.group("message") not in following, f"record printed twice: {line}"


def test_verbose_flag_shows_the_import_warnings_again(tmp_path: Path) -> None:
    done = _run(["train", "--help", "--verbose"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FutureWarning" in done.stderr  # anomalib's own deprecation notices, hidden by default
    quiet = _run(["train", "--help"], tmp_path)
    assert quiet.returncode == 0
    assert "FutureWarning" not in quiet.stderr


def test_int8_export_without_data_stops_at_once_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "never_read.ckpt"
    done = _run(
        [
            "export",
            "--model",
            "TileOutlier",
            "--ckpt_path",
            str(missing),
            "--export_type",
            "openvino",
            "--compression_type",
            "INT8_PTQ",
            "--export_root",
            str(tmp_path / "export"),
        ],
        tmp_path,
    )
    assert done.returncode != 0
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--data" in done.stderr
    assert "INT8_PTQ" in done.stderr
    assert not (tmp_path / "export").exists()  # nothing was exported before the error


def test_int8_calibration_warning_counts_images_and_batches() -> None:
    note = calibration_note(images=20, batches=1)
    assert note is not None
    assert "20 validation images (1 batch)" in note
    assert "300 or more" in note
    assert "46 validation images (2 batches)" in (calibration_note(46, 2) or "")
    assert calibration_note(images=300, batches=10) is None
