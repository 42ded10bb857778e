"""Shared fixtures: small synthetic datasets, generated once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.broken import install_from_environment

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub
os.environ.setdefault("SENTRY_OPT_OUT", "1")


def _share_cores_among_workers() -> None:
    """Under pytest-xdist (``make test`` runs one worker per core) each worker gets its share of the cores, in this
    process and in the processes it starts (CLI runs, the benchmark's cells): N workers with all cores each would
    fight over them and run slower than one."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    # macOS has no CPU affinity
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = str(max(1, cores // workers))
    os.environ.setdefault("OMP_NUM_THREADS", share)
    os.environ.setdefault("MKL_NUM_THREADS", share)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_cores_among_workers()

# ANOMALIB_EXT_BROKEN_MODEL=random|constant|shuffle: run the tests against a broken model (tests/harness/broken.py)
BROKEN_MODEL = install_from_environment()

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def keep_torch_threads() -> Iterator[None]:
    """Commands run in-process set torch's thread count; a test calling them must not change it for other tests."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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
def flecked_parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 px synthetic parts, the defects dark flecks of 4-6 px (tests/harness/flecks.py)."""
    from tests.harness.flecks import make_flecked_parts

    return make_flecked_parts(tmp_path_factory.mktemp("large"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data`` when present; tests that need it skip otherwise."""
    if not REAL_DATA.is_dir():
        pytest.skip("real data (../shared/data) not present")
    return REAL_DATA


def pytest_report_header() -> str | None:
    if BROKEN_MODEL:
        return f"BROKEN MODEL: every model's scores and maps are {BROKEN_MODEL} (tests/harness/broken.py)"
    return None
