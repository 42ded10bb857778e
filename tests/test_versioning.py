"""Versioned checkpoints: every model stamps the package version into its checkpoints, and a checkpoint of a release
whose models this one cannot read (0.3.x and older) fails on load with one line naming the release that reads it."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

import anomalib_ext
from anomalib_ext.cli import main as cli_main
from anomalib_ext.models import Fused, Reconstruction
from anomalib_ext.models.components import CHECKPOINT_VERSION_KEY, IncompatibleCheckpointError

MODELS = Path(anomalib_ext.__file__).parent / "models"


def test_version_comes_from_the_installed_metadata() -> None:
    assert anomalib_ext.__version__ == importlib.metadata.version("anomalib-ext")


def test_cli_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli_main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith(f"anomalib-ext {anomalib_ext.__version__} (anomalib 2.")


def _saved_checkpoint(path: Path, model: object = None) -> dict:
    """A real checkpoint of an untrained ``Reconstruction`` (or ``model``), written by Lightning."""
    trainer = Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", devices=1, enable_progress_bar=False)
    trainer.strategy.connect(model if model is not None else Reconstruction())
    trainer.save_checkpoint(path)
    return torch.load(path, weights_only=False)


def test_checkpoints_carry_the_version_and_load_back(tmp_path: Path) -> None:
    checkpoint = _saved_checkpoint(tmp_path / "model.ckpt")
    assert checkpoint[CHECKPOINT_VERSION_KEY] == anomalib_ext.__version__
    loaded = Reconstruction.load_from_checkpoint(tmp_path / "model.ckpt")
    for name, value in loaded.state_dict().items():  # exactly (an unfitted threshold is NaN on both sides)
        torch.testing.assert_close(value, checkpoint["state_dict"][name], rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize(
    ("written_by", "expected"),
    [
        (None, "written by anomalib-ext 0.3.x or older (it has no 'anomalib_ext_version')"),
        ("0.3.2", "written by anomalib-ext 0.3.2;"),
        ("0.2.0", "written by anomalib-ext 0.2.0;"),
    ],
)
def test_older_checkpoints_fail_with_one_line_naming_the_release_that_reads_them(
    tmp_path: Path, written_by: str | None, expected: str
) -> None:
    checkpoint = _saved_checkpoint(tmp_path / "model.ckpt")
    checkpoint.pop(CHECKPOINT_VERSION_KEY)
    if written_by is not None:
        checkpoint[CHECKPOINT_VERSION_KEY] = written_by
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(IncompatibleCheckpointError) as caught:
        Reconstruction.load_from_checkpoint(tmp_path / "old.ckpt")
    message = str(caught.value)
    assert "\n" not in message
    assert expected in message
    assert f"this is {anomalib_ext.__version__}, which reads checkpoints of 0.4 and later" in message
    assert f"pip install anomalib-ext=={written_by or '0.3.0'}" in message


def test_a_model_whose_buffers_changed_meaning_refuses_its_older_checkpoints(tmp_path: Path) -> None:
    """0.11.0's Fused density reads other features than 0.10.0's: a 0.10.0 Fused checkpoint would load its buffers
    (they resize) and fail on the first image with a shape error deep in the density; it is refused in one line."""
    checkpoint = _saved_checkpoint(tmp_path / "model.ckpt", Fused(image_size=64, tile_size=16, stride=16))
    assert Fused.oldest_readable_release == (0, 11) > Reconstruction.oldest_readable_release
    checkpoint[CHECKPOINT_VERSION_KEY] = "0.10.0"
    torch.save(checkpoint, tmp_path / "fused-0.10.ckpt")
    with pytest.raises(IncompatibleCheckpointError) as caught:
        Fused.load_from_checkpoint(tmp_path / "fused-0.10.ckpt")
    message = str(caught.value)
    assert "\n" not in message
    assert "written by anomalib-ext 0.10.0; this is" in message and "reads checkpoints of 0.11 and later" in message
    assert "pip install anomalib-ext==0.10.0" in message
    checkpoint[CHECKPOINT_VERSION_KEY] = anomalib_ext.__version__
    torch.save(checkpoint, tmp_path / "fused-now.ckpt")
    assert isinstance(Fused.load_from_checkpoint(tmp_path / "fused-now.ckpt"), Fused)


def test_an_old_checkpoint_whose_arguments_are_gone_fails_with_the_release_line(tmp_path: Path) -> None:
    """A 0.3.x checkpoint holds argument values 0.4 reads differently (Dfkdm's ``density: gaussian`` is now a
    group of settings): the constructor raises before ``on_load_checkpoint`` could look at the version."""
    checkpoint = _saved_checkpoint(tmp_path / "model.ckpt")
    checkpoint.pop(CHECKPOINT_VERSION_KEY)
    checkpoint["hyper_parameters"]["image_size"] = [128, 128, 3]  # a value this release's constructor refuses
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(IncompatibleCheckpointError, match="old.ckpt was written by anomalib-ext 0.3.x or older"):
        Reconstruction.load_from_checkpoint(tmp_path / "old.ckpt")


def test_every_model_checkpoint_hook_calls_super() -> None:
    """A model overriding ``on_load_checkpoint`` without ``super()`` would skip the version check (and one
    overriding ``on_save_checkpoint`` the stamp)."""
    missing = []
    for path in sorted(MODELS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in {"on_load_checkpoint", "on_save_checkpoint"}:
                calls_super = any(
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr == node.name
                    and isinstance(call.func.value, ast.Call)
                    and getattr(call.func.value.func, "id", None) == "super"
                    for call in ast.walk(node)
                )
                if not calls_super:
                    missing.append(f"{path.relative_to(MODELS)}::{node.name}")
    assert missing == []
