"""Shared fixtures: small synthetic datasets, generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub
os.environ.setdefault("SENTRY_OPT_OUT", "1")

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic MVTec-layout category ``synthetic`` (128 px, 32 train, 8 good + 12 defective test images)."""
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    root = tmp_path_factory.mktemp("mvtec")
    make_mvtec_dataset(root, category="synthetic", image_size=128, n_train=32, n_test_good=8, n_test_per_defect=3)
    return root


@pytest.fixture(scope="session")
def dice_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic dice-layout dataset (128 px, 11 classes)."""
    from anomalib_ext.data.synthetic import make_dice_dataset

    root = tmp_path_factory.mktemp("dice")
    make_dice_dataset(root, image_size=128, n_train_per_class=8, n_test_good_per_class=1, n_test_per_defect=3)
    return root


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data`` when present; tests that need it skip otherwise."""
    if not REAL_DATA.is_dir():
        pytest.skip("real data (../shared/data) not present")
    return REAL_DATA
