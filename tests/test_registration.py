"""Our models are anomalib models: listed, found by name, run by anomalib's own CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from anomalib.models import AnomalibModule, get_model, list_models
from anomalib.utils.path import convert_to_snake_case

import anomalib_ext.models as ours
from anomalib_ext.models.components import ExtModelMixin

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["TemplateSsim", "TileOutlier", "Dfkdm", "DfkdmLake", "Reconstruction", "TeacherStudent", "Fused"]
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


# planted defects on the synthetic object: TemplateSsim ranks them all above the normal images (AUROC 1.000 image,
# 0.996 pixel measured); random or constant scores give 0.5, and a shuffled model far below these bars
MIN_AUROC = 0.9


def _test_metrics(output: str) -> dict[str, float]:
    """The test metrics from the table Lightning prints at the end of ``anomalib train`` (``│ name │ value │``)."""
    rows = re.findall(r"[│|]\s*((?:image|pixel)_\w+)\s*[│|]\s*([-+0-9.eE]+|nan)\s*[│|]", output)
    return {name: float(value) for name, value in rows}


def _assert_detects_planted_defects(metrics: dict[str, float], output: str) -> None:
    assert {"image_AUROC", "pixel_AUROC"} <= metrics.keys(), f"no test metrics printed: {output[-3000:]}"
    assert metrics["image_AUROC"] >= MIN_AUROC, metrics
    assert metrics["pixel_AUROC"] >= MIN_AUROC, metrics


def _exported_image_auroc(xml: Path, test_dir: Path) -> float:
    """Image AUROC of the exported OpenVINO model itself on every test image (label from the folder name)."""
    from anomalib.deploy import OpenVINOInferencer
    from sklearn.metrics import roc_auc_score

    inferencer = OpenVINOInferencer(path=xml, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    paths = sorted(test_dir.rglob("*.png"))
    scores = [float(np.ravel(inferencer.predict(str(path)).pred_score)[0]) for path in paths]
    labels = [int(path.parent.name != "good") for path in paths]
    assert 0 < sum(labels) < len(labels)
    return float(roc_auc_score(labels, scores))


def test_anomalib_cli_trains_and_exports_our_model(tmp_path: Path, mvtec_root: Path) -> None:
    """``anomalib train`` with a shipped config tests the model it fitted (its metrics are checked, not only that
    a checkpoint exists), and ``anomalib export`` writes an OpenVINO model that detects the planted defects."""
    bin_dir = Path(sys.executable).parent
    trained = _run(
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
    _assert_detects_planted_defects(_test_metrics(trained.stdout), trained.stdout)
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
    exported = sorted((tmp_path / "export").rglob("model.xml"))
    assert exported, "anomalib export wrote no OpenVINO model"
    auroc = _exported_image_auroc(exported[0], mvtec_root / "synthetic" / "test")
    assert auroc >= MIN_AUROC, f"the exported model's image AUROC is {auroc:.3f}"


def test_short_model_names_through_anomalib_ext_cli(tmp_path: Path, mvtec_root: Path) -> None:
    """The short class name gives the same model: it trains and detects the planted defects."""
    bin_dir = Path(sys.executable).parent
    trained = _run(
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
    _assert_detects_planted_defects(_test_metrics(trained.stdout), trained.stdout)
