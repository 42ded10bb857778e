"""tools/train.py: the origin project's command line, end to end on synthetic MVTec-layout data."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

TOOL = Path(__file__).resolve().parents[1] / "tools" / "train.py"


@pytest.fixture(scope="module")
def train_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reconstruction_train_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_train_runs_end_to_end_and_writes_a_loadable_checkpoint(
    train_tool: ModuleType, mvtec_root: Path, tmp_path: Path
) -> None:
    from anomalib_ext.models import Reconstruction

    checkpoint = tmp_path / "ckpt" / "vae.ckpt"
    argv = [
        "--model", "vae",
        "--epochs", "2",
        "--batch_size", "8",
        "--learning_rate", "3e-3",
        "--size", "64",
        "--data_path", str(mvtec_root / "synthetic"),
        "--ckpt_path", str(checkpoint),
        "--latent_dim", "16",
        "--base_channels", "8",
    ]  # fmt: skip
    assert train_tool.main(argv) == 0
    assert checkpoint.is_file()
    summary = json.loads(checkpoint.with_suffix(".json").read_text())
    assert summary["model"] == "vae"
    assert summary["num_downsamples"] == 3  # 64 px -> 8 px bottleneck grid
    # two epochs already localise the planted defects (measured 0.99 / 0.99); an untrained or scrambled
    # autoencoder's residual is noise everywhere and lands near 0.5
    assert summary["test"]["pixel_AUROC"] >= 0.9
    assert summary["test"]["image_AUROC"] >= 0.85
    model = Reconstruction.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    assert model.model.variant == "vae"
    with torch.no_grad():
        output = model(torch.rand(1, 3, 64, 64))
    assert output.anomaly_map.shape[-2:] == (64, 64)


def test_dataset_root_with_category_and_checkpoint_folder(
    train_tool: ModuleType, mvtec_root: Path, tmp_path: Path
) -> None:
    root, category = train_tool.resolve_dataset(str(mvtec_root), "synthetic")
    assert (root, category) == (mvtec_root, "synthetic")
    assert (
        train_tool.resolve_checkpoint(str(tmp_path / "out"), "ae", "synthetic")
        == tmp_path / "out" / "ae_synthetic.ckpt"
    )
    assert train_tool.default_downsamples(128) == 4
    assert train_tool.default_downsamples(256) == 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data_path", "/nonexistent/bottle"], "no such folder"),
        (["--data_path", "{root}"], "train/good"),
        (["--data_path", "{root}", "--category", "cable"], "does not exist"),
        (["--data_path", "{category}", "--epochs", "0"], "--epochs"),
        (["--data_path", "{category}", "--size", "100", "--num_downsamples", "4"], "divisible"),
    ],
)
def test_bad_arguments_exit_with_a_one_line_error(
    train_tool: ModuleType, mvtec_root: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    argv = [part.format(root=mvtec_root, category=mvtec_root / "synthetic") for part in extra]
    assert train_tool.main([*argv, "--ckpt_path", str(mvtec_root.parent / "unused")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("train.py: error:")
    assert message in error
