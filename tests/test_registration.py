"""Our models are anomalib models: listed, found by name, run by anomalib's own CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from anomalib.models import AnomalibModule, get_model, list_models
from anomalib.utils.path import convert_to_snake_case

import anomalib_ext.models as ours
from anomalib_ext.models.components import ExtModelMixin

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["TemplateSsim", "TileOutlier", "Dfkdm", "Reconstruction", "TeacherStudent"]
# The cheapest config to run end to end through the CLI in a subprocess.
CLI_MODEL = "anomalib_ext.models.TemplateSsim"
CLI_CONFIG = REPO / "configs" / "template_ssim" / "mvtec.yaml"


def test_every_family_is_registered() -> None:
    assert sorted(ours.__all__) == sorted(FAMILIES)
    listed = list_models(case="pascal")
    for name in FAMILIES:
        model_class = getattr(ours, name)
        assert AnomalibModule in model_class.__bases__, f"{name} must subclass AnomalibModule directly"
        assert ExtModelMixin in model_class.__bases__, f"{name} must use the shared ExtModelMixin"
        assert name in listed


@pytest.mark.parametrize("name", FAMILIES)
def test_get_model_finds_short_and_snake_names(name: str) -> None:
    assert type(get_model(convert_to_snake_case(name))).__name__ == name
    assert type(get_model(name)).__name__ == name


def test_every_config_names_a_registered_model() -> None:
    import yaml

    configs = sorted((REPO / "configs").glob("*/*.yaml"))
    assert configs
    for config in configs:
        if config.parent.name == "histaugan":
            continue  # a GAN config for `python -m anomalib_ext.augment.histaugan`, not a model
        class_path = yaml.safe_load(config.read_text())["model"]["class_path"]
        assert class_path.startswith("anomalib_ext.models."), f"{config}: {class_path}"
        assert hasattr(ours, class_path.rsplit(".", 1)[1]), f"{config}: {class_path}"


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_anomalib_cli_trains_and_exports_our_model(tmp_path: Path, mvtec_root: Path) -> None:
    bin_dir = Path(sys.executable).parent
    _run(
        [
            str(bin_dir / "anomalib"),
            "train",
            "--config",
            str(CLI_CONFIG),
            "--data.init_args.root",
            str(mvtec_root),
            "--data.init_args.category",
            "synthetic",
            "--data.init_args.num_workers",
            "0",
            "--default_root_dir",
            str(tmp_path / "run"),
        ],
        cwd=REPO,
    )
    checkpoints = sorted((tmp_path / "run").rglob("*.ckpt"))
    assert checkpoints, "anomalib train wrote no checkpoint"
    _run(
        [
            str(bin_dir / "anomalib"),
            "export",
            "--model",
            CLI_MODEL,
            "--export_type",
            "openvino",
            "--ckpt_path",
            str(checkpoints[-1]),
            "--input_size",
            "[128,128]",
            "--export_root",
            str(tmp_path / "export"),
        ],
        cwd=REPO,
    )
    assert sorted((tmp_path / "export").rglob("model.xml")), "anomalib export wrote no OpenVINO model"


def test_short_model_names_through_anomalib_ext_cli(tmp_path: Path, mvtec_root: Path) -> None:
    bin_dir = Path(sys.executable).parent
    _run(
        [
            str(bin_dir / "anomalib-ext"),
            "train",
            "--model",
            CLI_MODEL.rsplit(".", 1)[1],
            "--data",
            "anomalib.data.MVTecAD",
            "--data.root",
            str(mvtec_root),
            "--data.category",
            "synthetic",
            "--data.num_workers",
            "0",
            "--default_root_dir",
            str(tmp_path),
        ],
        cwd=REPO,
    )
    assert sorted(tmp_path.rglob("*.ckpt"))
