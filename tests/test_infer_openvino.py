"""The edge tool: no torch, no anomalib, same answers as anomalib's OpenVINOInferencer."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "infer_openvino.py"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, mvtec_root: Path) -> Path:
    """A small trained and exported model (anomalib's Padim on our offline backbone: fast to fit)."""
    from anomalib.data import MVTecAD
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from anomalib.models import Padim

    from anomalib_ext.models.components import EXPORT_OPSET
    from anomalib_ext.weights import ensure_pretrained

    ensure_pretrained("tf_efficientnet_lite0")
    workdir = tmp_path_factory.mktemp("edge")
    model = Padim(backbone="tf_efficientnet_lite0", layers=["blocks.1", "blocks.2"], n_features=20)
    datamodule = MVTecAD(root=mvtec_root, category="synthetic", num_workers=0, val_split_mode="from_test", seed=0)
    engine = Engine(default_root_dir=workdir, accelerator="cpu", logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    return Path(
        engine.export(
            model=model,
            export_type=ExportType.OPENVINO,
            export_root=workdir / "export",
            input_size=(128, 128),
            onnx_kwargs={"opset_version": EXPORT_OPSET},
        )
    )


def test_tool_imports_neither_torch_nor_anomalib() -> None:
    probe = (
        "import sys, runpy; sys.argv=['x','--help']\n"
        f"try:\n    runpy.run_path({str(TOOL)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "heavy = {'torch', 'anomalib', 'anomalib_ext', 'lightning'}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print('BAD', bad)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "BAD []" in result.stdout, result.stdout[-500:]


def test_same_scores_as_anomalib_inferencer(exported: Path, mvtec_root: Path, tmp_path: Path) -> None:
    from anomalib.deploy import OpenVINOInferencer

    test_dir = mvtec_root / "synthetic" / "test"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"this is not a png")
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    for path in sorted(test_dir.rglob("*.png"))[::3]:
        (tmp_path / "in" / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--model", str(exported), "--input", str(tmp_path / "in"), "--output", str(output)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "broken.png" in result.stderr and "empty.png" in result.stderr
    rows = list(csv.DictReader((output / "predictions.csv").open()))
    errors = list(csv.DictReader((output / "errors.csv").open()))
    assert {Path(row["image"]).name for row in errors} == {"broken.png", "empty.png"}
    inferencer = OpenVINOInferencer(path=exported, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    assert len(rows) == len(list((tmp_path / "in").iterdir())) - 2
    for row in rows:
        expected = inferencer.predict(row["image"])
        assert abs(float(row["score"]) - float(np.ravel(expected.pred_score)[0])) < 1e-4, row["image"]
        assert int(row["label"]) == int(bool(np.ravel(expected.pred_label)[0]))
        assert (output / "overlays" / (Path(row["image"]).stem + ".png")).is_file()


def test_refuses_to_overwrite_a_previous_run(exported: Path, mvtec_root: Path, tmp_path: Path) -> None:
    (tmp_path / "previous.csv").write_text("keep me")
    image = next((mvtec_root / "synthetic" / "test" / "good").glob("*.png"))
    result = subprocess.run(
        [sys.executable, str(TOOL), "--model", str(exported), "--input", str(image), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "not empty" in result.stderr
    assert (tmp_path / "previous.csv").read_text() == "keep me"


def test_clear_error_for_a_missing_model(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    result = _run_tool(tmp_path / "nope.xml", tmp_path / "in", tmp_path / "o")
    assert result.returncode == 2
    assert "nope.xml" in result.stderr and "model file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_clear_error_for_a_folder_without_images(exported: Path, tmp_path: Path) -> None:
    """A real model and a folder holding no image (only a text file): the tool gets past loading the model and
    stops at the folder, naming it, without writing results."""
    source = tmp_path / "in"
    source.mkdir()
    (source / "notes.txt").write_text("not an image")
    result = _run_tool(exported, source, tmp_path / "o")
    assert result.returncode == 2, result.stderr
    assert f"{source}: no images" in result.stderr, result.stderr
    assert "model file not found" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "predictions.csv").exists()


def _run_tool(exported: Path, source: Path, output: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(TOOL), "--model", str(exported), "--input", str(source), "--output", str(output)]
    return subprocess.run([*command, *options], capture_output=True, text=True)


def test_async_throughput_mode_gives_the_sync_results_in_the_same_order(
    exported: Path, mvtec_root: Path, tmp_path: Path
) -> None:
    source = mvtec_root / "synthetic" / "test"
    sync = _run_tool(exported, source, tmp_path / "sync", "--mode", "sync")
    parallel = _run_tool(exported, source, tmp_path / "async", "--mode", "async", "--streams", "2", "--threads", "2")
    assert sync.returncode == 0, sync.stderr
    assert parallel.returncode == 0, parallel.stderr
    sync_rows = list(csv.DictReader((tmp_path / "sync" / "predictions.csv").open()))
    async_rows = list(csv.DictReader((tmp_path / "async" / "predictions.csv").open()))
    assert len(sync_rows) == len(list(source.rglob("*.png"))) > 8
    assert [row["image"] for row in async_rows] == [row["image"] for row in sync_rows]  # input order kept
    assert [row["label"] for row in async_rows] == [row["label"] for row in sync_rows]
    for sync_row, async_row in zip(sync_rows, async_rows, strict=True):
        assert abs(float(sync_row["score"]) - float(async_row["score"])) < 1e-5, sync_row["image"]
    sync_masks = sorted(path.name for path in (tmp_path / "sync" / "masks").iterdir())
    assert sync_masks == sorted(path.name for path in (tmp_path / "async" / "masks").iterdir())
    import cv2

    for name in sync_masks:
        a = cv2.imread(str(tmp_path / "sync" / "masks" / name), cv2.IMREAD_GRAYSCALE)
        b = cv2.imread(str(tmp_path / "async" / "masks" / name), cv2.IMREAD_GRAYSCALE)
        assert (a != b).mean() < 1e-3, name  # the same mask up to a pixel at the threshold


def test_progress_line_with_rate_and_time_left(exported: Path, mvtec_root: Path, tmp_path: Path) -> None:
    source = mvtec_root / "synthetic" / "test" / "good"
    total = len(list(source.glob("*.png")))
    result = _run_tool(exported, source, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert f"{total}/{total} images" in result.stderr
    assert "img/s" in result.stderr and "left" in result.stderr
    quiet = _run_tool(exported, source, tmp_path / "quiet", "--no-progress")
    assert quiet.returncode == 0 and "img/s" not in quiet.stderr


def test_an_export_without_resize_metadata_warns_once_and_resizes_like_anomalib(
    exported: Path, mvtec_root: Path, tmp_path: Path
) -> None:
    """anomalib's own models (and older anomalib-ext exports) do not record how they resize: images of another
    size get one warning line for the whole run, naming the model, and anomalib's default resize (torchvision
    bilinear, antialiased: its Padim's pre-processor), so the scores are the inferencer's on the image resized
    that way. Images already at the export's size need no resize and get no warning."""
    import cv2
    import torch
    from anomalib.deploy import OpenVINOInferencer
    from torchvision.transforms.v2.functional import resize

    source = tmp_path / "in"
    source.mkdir()
    for index, path in enumerate(sorted((mvtec_root / "synthetic" / "test").rglob("*.png"))[:6:2]):
        image = cv2.imread(str(path))
        cv2.imwrite(str(source / f"{index}_large.png"), cv2.resize(image, (150, 180), interpolation=cv2.INTER_CUBIC))
        cv2.imwrite(str(source / f"{index}_small.png"), cv2.resize(image, (100, 70), interpolation=cv2.INTER_CUBIC))
    result = _run_tool(exported, source, tmp_path / "out", "--no-progress")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(exported) in warnings[0] and "does not record" in warnings[0], result.stderr
    inferencer = OpenVINOInferencer(path=exported, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert len(rows) == 6
    for row in rows:
        rgb = cv2.cvtColor(cv2.imread(row["image"]), cv2.COLOR_BGR2RGB)
        image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
        resized = resize(image, [128, 128], antialias=True).clamp(0, 1)  # the inferencer divides > 1.0 by 255
        expected = inferencer.predict(resized.numpy().transpose(1, 2, 0))
        assert abs(float(row["score"]) - float(np.ravel(expected.pred_score)[0])) < 1e-4, row["image"]
    same_size = _run_tool(exported, mvtec_root / "synthetic" / "test" / "good", tmp_path / "same", "--no-progress")
    assert same_size.returncode == 0 and "warning:" not in same_size.stderr, same_size.stderr
