"""Single-template TeacherStudent from one good image, through the user's commands (issue 23).

A user with one good image runs the shipped config (``anomalib-ext train --config .../single_template.yaml``) on
a folder whose ``train/good`` holds that image alone (so validation is empty), then scores new images with
``anomalib-ext score``. Until 0.5.0 the training epochs were cut short (``on_train_batch_start`` returned -1), so
validation never ran: no threshold, no normalisation (raw scores compared with 0.5) and, with an empty validation
set, no checkpoint at all. The threshold now comes from held-out variations of the template (Tukey's fence over
their scores).

The part is the synthetic woven texture: its normal parts differ by pose, phase and lighting, which the template's
variations (rotation, shift, colour jitter) cover. On the synthetic object, whose every part has a fresh random
surface texture that no variation of one image shows, the fence flags most normal images (docs/thresholds.md,
"One good image", limits).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anomalib_ext.cli import shipped_configs
from anomalib_ext.data.synthetic import make_mvtec_dataset
from anomalib_ext.models.components.thresholds import RobustThresholdPostProcessor, tukey_fence

BIN = Path(sys.executable).parent
IMAGE_SIZE = 64


def _run(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(  # noqa: S603
        [str(BIN / "anomalib-ext"), *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ),
        timeout=1800,
        check=False,
    )


@pytest.fixture(scope="module")
def one_image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MVTec layout (woven texture) whose ``train/good`` holds one image; 10 good and 12 defective test images."""
    source = make_mvtec_dataset(
        tmp_path_factory.mktemp("single_source"),
        image_size=IMAGE_SIZE,
        n_train=1,
        n_test_good=10,
        n_test_per_defect=3,
        kind="texture",
    )
    root = tmp_path_factory.mktemp("single_root")
    shutil.copytree(source, root / "synthetic")
    assert len(list((root / "synthetic" / "train" / "good").iterdir())) == 1
    return root


@pytest.fixture(scope="module")
def predictions(one_image_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """Train with the shipped config from the one image, then score the test folder with the checkpoint."""
    work = tmp_path_factory.mktemp("single_run")
    template = next((one_image_root / "synthetic" / "train" / "good").iterdir())
    trained = _run(
        [
            "train",
            "--config",
            str(shipped_configs()["teacher_student/single_template"]),
            "--data.init_args.root",
            str(one_image_root),
            "--data.init_args.category",
            "synthetic",
            "--model.init_args.image_size",
            str(IMAGE_SIZE),
            "--model.init_args.map_sigma",
            "1.0",  # the config's 2 px at 128 px, at 64 px
            "--model.init_args.single_template.path",
            str(template),
            "--trainer.max_epochs",
            "5",
        ],
        work,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoints = sorted(work.rglob("*.ckpt"))
    assert checkpoints, f"training wrote no checkpoint: {trained.stderr[-2000:]}"
    thresholds = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)["state_dict"]
    assert torch.isfinite(thresholds["post_processor._image_threshold"]), "no threshold in the checkpoint"
    scored = _run(
        [
            "score",
            "--ckpt_path",
            str(checkpoints[-1]),
            "--input",
            str(one_image_root / "synthetic" / "test"),
            "--output",
            str(work / "scores"),
        ],
        work,
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    with (work / "scores" / "predictions.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_one_good_image_flags_planted_defects_and_not_every_normal(predictions: list[dict[str, str]]) -> None:
    """The threshold from the one image flags most planted defects, leaves most normals alone and beats flagging
    every image; the normalised score is 0.5 at the threshold, as for every model."""
    defective = [row for row in predictions if Path(row["image_path"]).parent.name != "good"]
    normal = [row for row in predictions if Path(row["image_path"]).parent.name == "good"]
    assert len(defective) == 12 and len(normal) == 10
    recall = sum(int(row["pred_label"]) for row in defective) / len(defective)
    flagged_normals = sum(int(row["pred_label"]) for row in normal)
    assert recall >= 0.75, f"only {recall:.0%} of the planted defects flagged"
    assert flagged_normals <= len(normal) // 2, f"{flagged_normals} of {len(normal)} normal images flagged"
    true_positives = recall * len(defective)
    f1 = 2 * true_positives / (len(defective) + true_positives + flagged_normals)
    flag_everything = 2 * len(defective) / (2 * len(defective) + len(normal))
    assert f1 >= flag_everything + 0.05, f"F1 {f1:.3f}, flagging every image gives {flag_everything:.3f}"
    for row in predictions:  # normalised around the threshold: the label is the score's side of 0.5
        assert int(row["pred_label"]) == int(float(row["pred_score"]) > 0.5), row


def test_tukey_fence_ignores_a_minority_of_extreme_normal_variations() -> None:
    """The threshold sits above the bulk of the variations' scores, not among the extreme minority that a max- or
    90 %-quantile rule would follow; min/max normalisation is filled in when no validation set it."""
    torch.manual_seed(0)
    bulk = 1.0 + 0.1 * torch.randn(50)
    extremes = torch.linspace(3.0, 5.0, 14)  # 22 % of the draws score like defects
    scores = torch.cat([bulk, extremes])
    processor = RobustThresholdPostProcessor()
    processor.threshold_from_normal_variations(scores, torch.rand(64, 1, 8, 8))
    threshold = float(processor._image_threshold)  # noqa: SLF001  (anomalib's buffer, what export and labels use)
    assert threshold == pytest.approx(float(tukey_fence(scores)))
    assert bulk.max() < threshold < 2.0 < float(torch.quantile(scores, 0.9))
    assert float(processor.image_min) == pytest.approx(float(scores.min()))
    assert float(processor.image_max) == pytest.approx(float(scores.max()))
    assert not torch.isnan(processor.pixel_min) and not torch.isnan(processor.pixel_max)
