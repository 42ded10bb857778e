"""Faults: an interrupted ``anomalib train`` leaves a usable checkpoint; runs never overwrite earlier runs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml


def _reconstruction_config(tmp_path: Path) -> Path:
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    make_mvtec_dataset(tmp_path / "data", category="synthetic", image_size=32, n_train=8, n_test_good=2)
    config = {
        "seed_everything": 0,
        "default_root_dir": str(tmp_path / "results"),
        "trainer": {
            "max_epochs": 10_000,  # far more than the test waits for: it is always interrupted
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
        },
        "model": {
            "class_path": "anomalib_ext.models.Reconstruction",
            "init_args": {"variant": "ae", "image_size": 32, "latent_dim": 8, "base_channels": 8, "num_downsamples": 2},
        },
        "data": {
            "class_path": "anomalib.data.MVTecAD",
            "init_args": {
                "root": str(tmp_path / "data"),
                "category": "synthetic",
                "train_batch_size": 4,
                "eval_batch_size": 4,
                "num_workers": 0,
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(pattern: str, root: Path, process: subprocess.Popen, timeout: float) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(root.rglob(pattern)) if root.exists() else []
        if found or process.poll() is not None:
            return found
        time.sleep(1.0)
    return []


@pytest.fixture(scope="module", params=[signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def interrupted(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[signal.Signals, int, str, Path]:
    """``anomalib train`` of a gradient-trained model, interrupted after its first checkpoint."""
    signum = request.param
    tmp_path = tmp_path_factory.mktemp(f"interrupted_{signum.name}")
    config = _reconstruction_config(tmp_path)
    anomalib = Path(sys.executable).with_name("anomalib")
    with (tmp_path / "log.txt").open("w") as log:
        process = subprocess.Popen(  # noqa: S603  (our own interpreter's entry point, fixed arguments)
            [str(anomalib), "train", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            # a non-interactive shell (CI) starts background jobs with SIGINT ignored, and children inherit
            # that: restore the default so Ctrl-C reaches Python as KeyboardInterrupt, as in a terminal
            preexec_fn=_default_sigint,
        )
        try:
            checkpoints = _wait_for("*.ckpt", tmp_path / "results", process, timeout=900)
            assert process.poll() is None, f"training ended by itself: {(tmp_path / 'log.txt').read_text()[-2000:]}"
            assert checkpoints, "no checkpoint after the first epochs"
            time.sleep(2.0)  # let it get into a later epoch
            process.send_signal(signum)
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return signum, process.returncode, (tmp_path / "log.txt").read_text(), tmp_path / "results"


def test_interrupted_training_leaves_a_usable_checkpoint(interrupted) -> None:
    from anomalib_ext.models import Reconstruction

    _, _, output, results = interrupted
    checkpoints = sorted(results.rglob("*.ckpt"))
    assert checkpoints
    for checkpoint in checkpoints:
        model = Reconstruction.load_from_checkpoint(checkpoint, map_location="cpu").eval()
        with torch.no_grad():
            result = model(torch.rand(2, 3, 32, 32))
        assert torch.isfinite(result.pred_score).all(), f"{checkpoint}: {output[-1000:]}"
        assert torch.isfinite(result.anomaly_map).all()


def test_interrupted_training_does_not_report_success(interrupted) -> None:
    signum, returncode, output, _ = interrupted
    assert returncode != 0, f"exit status 0 after {signum.name}: {output[-500:]}"
    if signum == signal.SIGTERM:
        assert returncode == 143, output[-500:]
        assert "interrupted by SIGTERM" in output, output[-500:]


def test_runs_go_to_new_version_folders(tmp_path: Path) -> None:
    """Engine writes each run under ``<root>/<model>/<data>/<category>/v<N>`` (anomalib's create_versioned_dir)."""
    from anomalib.utils.path import create_versioned_dir

    first = create_versioned_dir(tmp_path)
    (first / "results.txt").write_text("first run")
    second = create_versioned_dir(tmp_path)
    assert second != first
    assert (first / "results.txt").read_text() == "first run"
    assert (tmp_path / "latest").resolve() == second.resolve()
