"""Config and checkpoint mistakes: misspelt or unknown keys, wrong types, missing or foreign checkpoints.

Configs go through anomalib's own CLI parser (``AnomalibCLI``), as ``anomalib train --config`` does; one test
runs the real command in a subprocess to show the user sees the message without a Python traceback.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import anomalib_ext
import anomalib_ext.models as ext_models
from anomalib_ext.models.components import CHECKPOINT_VERSION_KEY
from tests.robustness.models import cheapest_cases

MODEL_NAMES = list(ext_models.__all__)
REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, model_name: str, init_args: dict, trainer: dict | None = None, **top) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, **(trainer or {})},
        "model": {"class_path": f"anomalib_ext.models.{model_name}", "init_args": init_args},
        "data": {
            "class_path": "anomalib.data.MVTecAD",
            "init_args": {"root": str(tmp_path / "data"), "category": "synthetic", "num_workers": 0},
        },
        **top,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _parse(config: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run anomalib's CLI parser on ``train --config``; return what it printed to stderr when it refused."""
    from anomalib.cli import AnomalibCLI

    with pytest.raises(SystemExit) as caught:
        AnomalibCLI(args=["train", "--config", str(config)], run=False)
    assert caught.value.code not in (0, None)
    return capsys.readouterr().err


def _int_parameter(model_name: str) -> tuple[str, dict[str, Any]] | None:
    """A constructor parameter annotated ``int``, or an ``int`` field of a nested settings group (``density``,
    ``tiling``, ...): its name and the model arguments that give it a wrong type."""
    model_class = getattr(ext_models, model_name)
    hints = typing.get_type_hints(model_class.__init__)
    for name in inspect.signature(model_class.__init__).parameters:
        if hints.get(name) is int:
            return name, {name: "lots"}
    for name in inspect.signature(model_class.__init__).parameters:
        group = next((arg for arg in typing.get_args(hints.get(name)) or (hints.get(name),) if is_dataclass(arg)), None)
        if group is None:
            continue
        field_hints = typing.get_type_hints(group)
        for item in fields(group):
            if field_hints[item.name] is int:
                return item.name, {name: {item.name: "lots"}}
    return None


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_misspelt_model_key_is_named(model_name: str, tmp_path: Path, capsys) -> None:
    err = _parse(_config(tmp_path, model_name, {"imagesize_typo": 64}), capsys)
    assert "imagesize_typo" in err
    assert "not accepted" in err


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_wrong_type_is_named(model_name: str, tmp_path: Path, capsys) -> None:
    found = _int_parameter(model_name)
    assert found is not None, f"{model_name} has no int parameter, nested or not"
    parameter, arguments = found
    err = _parse(_config(tmp_path, model_name, arguments), capsys)
    assert parameter in err
    assert "lots" in err


def test_unknown_top_level_and_trainer_keys_are_named(tmp_path: Path, capsys) -> None:
    name = MODEL_NAMES[0] if MODEL_NAMES else pytest.skip("no model yet")
    err = _parse(_config(tmp_path, name, {}, trainer={"max_epochz": 3}), capsys)
    assert "max_epochz" in err
    err = _parse(_config(tmp_path, name, {}, modle={"x": 1}), capsys)
    assert "modle" in err


def test_anomalib_train_shows_the_key_without_a_traceback(tmp_path: Path) -> None:
    """What a user really runs: one subprocess (slow to start, so only one)."""
    name = MODEL_NAMES[0] if MODEL_NAMES else pytest.skip("no model yet")
    config = _config(tmp_path, name, {"imagesize_typo": 64})
    anomalib = Path(sys.executable).with_name("anomalib")
    result = subprocess.run(  # noqa: S603  (our own interpreter's entry point, fixed arguments)
        [str(anomalib), "train", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert "imagesize_typo" in result.stderr
    assert "Traceback" not in result.stderr


# --- checkpoints ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_missing_checkpoint_is_named(model_name: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.ckpt"
    with pytest.raises(FileNotFoundError) as caught:
        getattr(ext_models, model_name).load_from_checkpoint(missing, map_location="cpu")
    assert str(missing) in str(caught.value)


def _checkpoint_of(model, path: Path) -> Path:
    """A Lightning-format checkpoint of an (untrained) model, as ``trainer.save_checkpoint`` would hold it."""
    import lightning

    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "hparams_name": "kwargs",
            CHECKPOINT_VERSION_KEY: anomalib_ext.__version__,
            "pytorch-lightning_version": lightning.__version__,
            "epoch": 0,
            "global_step": 0,
        },
        path,
    )
    return path


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    """Each model refuses the checkpoint of the next one in the list (never loads it silently)."""
    cases = cheapest_cases()
    if len(cases) < 2:
        pytest.skip("needs two models")
    built = [case.build() for case in cases]
    for index, model in enumerate(built):
        other = built[(index + 1) % len(built)]
        checkpoint = _checkpoint_of(other, tmp_path / f"{type(other).__name__}.ckpt")
        with pytest.raises((RuntimeError, KeyError, TypeError, ValueError)) as caught:
            type(model).load_from_checkpoint(checkpoint, map_location="cpu")
        assert type(model).__name__ in str(caught.value) or type(other).__name__ in str(caught.value), (
            f"loading a {type(other).__name__} checkpoint into {type(model).__name__}: {caught.value}"
        )
