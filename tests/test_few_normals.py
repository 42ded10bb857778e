"""Few normal images (issue 23): every family trains and says in one line when its settings are too rich.

Dfkdm: with n <= d the sample covariance of the pooled features is singular and its small eigenvalues are far too
small; ``FeatureDensity`` then shrinks it (Ledoit-Wolf) and Dfkdm says so in one warning. The real-data test trains
on bottle subsampled to 24 training normals (30 in train/good, 20 % held out for validation), the size of the user's
cookie set that scored 0.48 (issue 23), through anomalib's Engine as ``anomalib train`` does.

Every family on 10 synthetic normals (8 to train): one warning line each (a bank cap above the tiles, a density with
more dimensions than images, too few images to hold out for TemplateSsim's statistics, a gradient family's epochs giving
fewer optimiser steps than its ``min_steps``, which it then trains).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule
from sklearn.covariance import ledoit_wolf_shrinkage as sklearn_ledoit_wolf_shrinkage
from sklearn.metrics import roc_auc_score

from anomalib_ext.models import Dfkdm
from anomalib_ext.models.components.kde import FeatureDensity, ledoit_wolf_shrinkage
from anomalib_ext.models.components.training_budget import DEFAULT_MIN_STEPS

TRAIN_NORMALS = 30  # every 7th of bottle's 209; the synthetic validation split keeps 24 for training
FEATURE_DIMS = 472  # tf_efficientnet_lite0 blocks.2 + blocks.4 + blocks.6 channels (40 + 112 + 320)


def _train_and_score(root: Path, category: str, image_size: int, workdir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Fit the shipped Dfkdm defaults on ``root/category`` and return raw test scores and labels."""
    torch.manual_seed(0)
    model = Dfkdm(image_size=image_size, check_data=False)
    datamodule = MVTecAD(
        root=root,
        category=category,
        train_batch_size=16,
        eval_batch_size=16,
        num_workers=0,
        val_split_mode="synthetic",
        val_split_ratio=0.2,
        seed=42,
    )
    engine = Engine(default_root_dir=workdir, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    scores: list[float] = []
    hook = model.model.register_forward_hook(lambda _m, _i, out: scores.extend(out.pred_score.flatten().tolist()))
    try:
        predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    finally:
        hook.remove()
    labels = [label for batch in predictions for label in batch.gt_label.flatten().int().tolist()]
    return np.array(scores), np.array(labels)


def _few_shrinkage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and "feature dimensions" in record.getMessage()
    ]


def test_ledoit_wolf_shrinkage_matches_scikit_learn() -> None:
    points = torch.randn(12, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    points[:, :5] *= 6.0
    assert ledoit_wolf_shrinkage(points) == pytest.approx(float(sklearn_ledoit_wolf_shrinkage(points.numpy())))


def test_density_of_fewer_points_than_dimensions_is_shrunk_and_ranks_a_planted_defect_first() -> None:
    generator = torch.Generator().manual_seed(0)
    dims, strong = 64, 4
    basis = torch.linalg.qr(torch.randn(dims, dims, generator=generator))[0]
    scales = torch.ones(dims)
    scales[:strong] = 5.0

    def normal(count: int) -> torch.Tensor:
        return (torch.randn(count, dims, generator=generator) * scales) @ basis.T

    train, normals = normal(12), normal(40)
    defect = normal(1) + 15.0 * basis[:, strong + 3]  # a weak direction: small for the data, large for a normal
    density = FeatureDensity(density="gaussian", n_components=0.97, residual=True)
    density.fit(train)
    assert 0.0 < density.shrinkage < 1.0
    scores = density(torch.cat([normals, defect]))
    assert torch.isfinite(scores).all()
    assert scores[-1] > scores[:-1].max()
    # many points: no shrinkage, the fit is the plain probabilistic PCA
    density.fit(normal(200))
    assert density.shrinkage == 0.0


def test_dfkdm_warns_once_and_still_separates_when_images_are_fewer_than_dimensions(
    mvtec_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    scores, labels = _train_and_score(mvtec_root, "synthetic", 128, tmp_path)
    warnings = _few_shrinkage_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert f"for {FEATURE_DIMS} feature dimensions" in warnings[0]
    assert "Ledoit-Wolf" in warnings[0]
    assert roc_auc_score(labels, scores) >= 0.9


def test_dfkdm_on_bottle_with_24_training_normals(real_data: Path, tmp_path: Path) -> None:
    """The regression test of issue 23: 0.48 image AUROC on a 31-normal set; here bottle, 24 normals."""
    source = real_data / "mvtec_ad" / "bottle"
    target = tmp_path / "data" / "bottle"
    shutil.copytree(source / "test", target / "test")  # copies: anomalib's loader refuses symlinks leaving the root
    shutil.copytree(source / "ground_truth", target / "ground_truth")
    (target / "train" / "good").mkdir(parents=True)
    for image in sorted((source / "train" / "good").glob("*.png"))[::7][:TRAIN_NORMALS]:
        shutil.copy(image, target / "train" / "good" / image.name)
    scores, labels = _train_and_score(tmp_path / "data", "bottle", 256, tmp_path / "run")
    assert len(labels) == 83
    assert roc_auc_score(labels, scores) >= 0.97


# ------------------------------------------------------------------------------------- every family, 10 normals
FEW_NORMALS = 10  # in train/good: the synthetic validation split keeps 8 for training (one batch of 16)


@pytest.fixture(scope="module")
def ten_normals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic MVTec-layout category with 10 training normals (64 px)."""
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    root = tmp_path_factory.mktemp("few")
    make_mvtec_dataset(root, category="few", image_size=64, n_train=FEW_NORMALS, n_test_good=4, n_test_per_defect=1)
    return root


def _fit_on_ten_normals(model: AnomalibModule, root: Path, workdir: Path, max_epochs: int = 1) -> Engine:
    datamodule = MVTecAD(
        root=root,
        category="few",
        train_batch_size=16,
        eval_batch_size=16,
        num_workers=0,
        val_split_mode="synthetic",
        val_split_ratio=0.2,
        seed=0,
    )
    engine = Engine(
        default_root_dir=workdir,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        max_epochs=max_epochs,
    )
    engine.fit(model=model, datamodule=datamodule)
    return engine


def _our_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and record.name.startswith("anomalib_ext")
    ]


MIN_STEPS = 12  # the gradient families' min_steps in these tests (50 by default): cheap, and still 12x max_epochs
STEPS = f"1 optimiser step(s) an epoch, 1 in 1 epochs, fewer than the {MIN_STEPS} it trains at least"


@pytest.mark.parametrize(
    ("family", "fragments"),
    [
        ("TileOutlier", ["fewer than the bank's cap max_tiles=13456"]),
        ("Dfkdm", ["8 training images for 472 feature dimensions"]),
        ("TemplateSsim", ["8 images: every image builds the template and the statistics come from 5-fold"]),
        ("Reconstruction", [STEPS]),
        ("TeacherStudent", [STEPS]),
        # two settings too rich, one line each: the density's dimensions and the autoencoder's steps
        ("DfkdmLake", ["8 training images for 35 feature dimensions", STEPS]),
    ],
)
def test_every_family_says_in_one_line_when_its_settings_are_too_rich_for_ten_normals(
    family: str,
    fragments: list[str],
    ten_normals: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import anomalib_ext.models as models

    options = {"TemplateSsim": {"class_folders": False, "num_templates": 1}}.get(family, {})
    model_class = getattr(models, family)
    if STEPS in fragments:
        assert model_class.min_steps == DEFAULT_MIN_STEPS
        monkeypatch.setattr(model_class, "min_steps", MIN_STEPS)
    model = model_class(image_size=64, check_data=False, **options)
    caplog.set_level(logging.WARNING)
    engine = _fit_on_ten_normals(model, ten_normals, tmp_path)
    warnings = _our_warnings(caplog)
    assert len(warnings) == len(fragments), warnings
    for fragment in fragments:
        [line] = [warning for warning in warnings if fragment in warning]
        assert line.startswith(f"{family}: ") and "\n" not in line, line
    if STEPS in fragments:
        # a gradient family trained min_steps optimiser steps, not the one that max_epochs=1 gives
        assert engine.trainer.global_step == MIN_STEPS
        assert any(f"training {MIN_STEPS} epochs ({MIN_STEPS} steps) instead" in warning for warning in warnings)


def test_settings_that_fit_the_data_say_nothing(
    ten_normals: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bank cap the 8 images fill, and an epoch budget above min_steps: no warning, the run keeps its epochs."""
    from anomalib_ext.models import Reconstruction, TileOutlier

    monkeypatch.setattr(Reconstruction, "min_steps", MIN_STEPS)
    caplog.set_level(logging.WARNING)
    _fit_on_ten_normals(
        TileOutlier(image_size=64, memory_bank={"max_tiles": 64}, check_data=False), ten_normals, tmp_path
    )
    engine = _fit_on_ten_normals(
        Reconstruction(image_size=64, check_data=False), ten_normals, tmp_path / "r", MIN_STEPS + 3
    )
    assert _our_warnings(caplog) == []
    assert engine.trainer.global_step == MIN_STEPS + 3
