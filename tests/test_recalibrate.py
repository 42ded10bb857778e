"""``anomalib-ext recalibrate``: a model trained under one light, its threshold reset from a few normals of another.

A TileOutlier is fitted on small synthetic normal images. A "new light" set (gain 0.5, gamma 1.5: every image darker)
moves every normal score above the trained threshold, while the ranking holds. Recalibrated on ten darkened
normals (plus two unreadable files, skipped), the checkpoint must flag at most one of eight other darkened normals
and still every planted defect, with nothing but the post-processor's buffers changed, and give the same labels
through ``anomalib-ext score``, ``Engine.predict(ckpt_path=...)`` and its OpenVINO export.
"""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.models import AnomalibModule

from anomalib_ext.cli import main as cli_main
from anomalib_ext.commands.score import ScoreError
from tests.harness.runner import fit_small_tile_outlier

IMAGE_SIZE = 64
GAIN, GAMMA = 0.5, 1.5  # the new light: darker and more contrasted in the shadows
BIN = Path(sys.executable).parent
INFER_TOOL = Path(__file__).resolve().parents[1] / "tools" / "infer_openvino.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TileOutlier fitted on 16 synthetic normal images under the old light; its folder holds the test images."""
    return fit_small_tile_outlier(tmp_path_factory.mktemp("recalibrate_fit"), n_test_good=18)


def darken(source: Path, target: Path) -> None:
    from PIL import Image

    image = np.asarray(Image.open(source).convert("RGB"), dtype=np.float32) / 255
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(GAIN * image**GAMMA, 0, 1) * 255).round().astype(np.uint8)).save(target)


@pytest.fixture(scope="module")
def new_light(trained: Path) -> Path:
    """``normals/`` (10 darkened normals, an empty file, a text file named .png), ``test/good`` (8 other darkened
    normals), ``test/defect`` (8 darkened planted defects, two of each kind)."""
    category = trained.parent / "synthetic" / "test"
    root = trained.parent / "new_light"
    good = sorted((category / "good").glob("*.png"))
    for path in good[:10]:
        darken(path, root / "normals" / path.name)
    (root / "normals" / "empty.png").write_bytes(b"")
    (root / "normals" / "notes.png").write_text("not an image\n")
    for path in good[10:]:
        darken(path, root / "test" / "good" / path.name)
    for path in sorted(category.glob("*/*.png")):
        if path.parent.name != "good":
            darken(path, root / "test" / "defect" / f"{path.parent.name}_{path.name}")
    return root


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """``anomalib-ext ...`` through the CLI's own dispatcher, in this process; the exit status, stdout, stderr."""
    with pytest.raises(SystemExit) as stopped:
        cli_main(list(map(str, args)))
    captured = capsys.readouterr()
    return int(stopped.value.code), captured.out, captured.err


def labels_by_score(capsys: pytest.CaptureFixture[str], checkpoint: Path, images: Path, output: Path) -> dict[str, int]:
    """``anomalib-ext score`` labels, by image path."""
    status, _, err = run_cli(
        capsys, "score", "--ckpt_path", checkpoint, "--input", images, "--output", output, "--workers", "0", "--quiet"
    )
    assert status == 0, err
    with (output / "predictions.csv").open(newline="") as handle:
        return {row["image_path"]: int(row["pred_label"]) for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def recalibrated(trained: Path, new_light: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """``anomalib-ext recalibrate`` on the darkened normals, as a user runs it."""
    output = trained.parent / "recalibrated" / "model.ckpt"
    command = [str(BIN / "anomalib-ext"), "recalibrate", "--ckpt_path", str(trained)]
    command += ["--normals", str(new_light / "normals"), "--output", str(output), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)  # noqa: S603
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


def edge_labels(model: AnomalibModule, images: Path, workdir: Path) -> dict[str, int]:
    """``model`` exported to OpenVINO and run by ``tools/infer_openvino.py`` on ``images``: labels by file name."""
    xml = model.eval().to_openvino(export_root=workdir / "export", input_size=(IMAGE_SIZE, IMAGE_SIZE))
    edge = workdir / "edge"
    command = [sys.executable, str(INFER_TOOL), "--model", str(xml), "--input", str(images)]
    result = subprocess.run(  # noqa: S603
        [*command, "--output", str(edge), "--mode", "sync", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with (edge / "predictions.csv").open(newline="") as handle:
        return {Path(row["image"]).name: int(row["label"]) for row in csv.DictReader(handle)}


def split(labels: dict[str, int]) -> tuple[list[int], list[int]]:
    normal = [label for path, label in labels.items() if Path(path).parent.name == "good"]
    defect = [label for path, label in labels.items() if Path(path).parent.name == "defect"]
    return normal, defect


@pytest.mark.usefixtures("keep_torch_threads")
def test_recalibration_stops_flagging_the_new_normals_and_keeps_flagging_defects(
    trained: Path, new_light: Path, recalibrated, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output, result = recalibrated
    original = trained.read_bytes()

    normal, defect = split(labels_by_score(capsys, trained, new_light / "test", tmp_path / "before"))
    assert len(normal) == 8 and len(defect) == 8
    assert sum(normal) >= 7, f"the new light must defeat the trained threshold first: {normal}"

    # the unreadable files are named and skipped; the summary says what the old threshold did to the new normals
    assert "recalibrated on 10 normal images" in result.stdout, result.stdout
    assert "rule anchored;" in result.stdout and "the old one flagged 10, the new one flags" in result.stdout, (
        result.stdout
    )
    assert "empty.png" in result.stderr and "notes.png" in result.stderr, result.stderr

    normal, defect = split(labels_by_score(capsys, output, new_light / "test", tmp_path / "after"))
    assert sum(normal) <= 1, f"recalibrated, at most one of 8 new-light normals flagged: {normal}"
    assert sum(defect) == len(defect), f"recalibrated, every planted defect still flagged: {defect}"

    # no retraining: only the post-processor's buffers differ, in the state_dict and in its callback state
    old = torch.load(trained, map_location="cpu", weights_only=False)
    new = torch.load(output, map_location="cpu", weights_only=False)
    changed = {key for key in old["state_dict"] if not torch.equal(old["state_dict"][key], new["state_dict"][key])}
    assert changed and all(key.startswith("post_processor.") for key in changed), changed
    assert "post_processor._image_threshold" in changed and "post_processor.image_max" in changed
    assert set(old["state_dict"]) == set(new["state_dict"])
    callback = next(state for state in new["callbacks"].values() if "_image_threshold" in state)
    assert torch.equal(callback["_image_threshold"], new["state_dict"]["post_processor._image_threshold"])
    record = new["anomalib_ext_recalibration"]
    assert record["images"] == 10 and len(record["skipped"]) == 2 and record["margin"] == 0.5
    assert record["rule"] == "anchored"
    assert trained.read_bytes() == original, "the trained checkpoint is left as it was"

    # Engine.predict with the checkpoint (it restores the callback state too) labels as the command does
    from anomalib.data import PredictDataset
    from anomalib.engine import Engine
    from torch.utils.data import DataLoader

    from anomalib_ext.models import TileOutlier

    dataset = PredictDataset(new_light / "test")
    engine = Engine(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    model = TileOutlier.load_from_checkpoint(output, visualizer=False)
    loader = DataLoader(dataset, batch_size=4, collate_fn=dataset.collate_fn)
    batches = engine.predict(model=model, dataloaders=loader, ckpt_path=output)
    by_engine = {
        path: int(label) for batch in batches for path, label in zip(batch.image_path, batch.pred_label, strict=True)
    }
    assert by_engine == labels_by_score(capsys, output, new_light / "test", tmp_path / "again")

    # the Python call on a loaded model, given the image paths, sets what the command wrote
    from anomalib_ext.commands.recalibrate import recalibrate

    model = TileOutlier.load_from_checkpoint(trained, visualizer=False)
    recalibration = recalibrate(model, sorted((new_light / "normals").iterdir()))
    assert len(recalibration.normals.scores) == 10 and len(recalibration.normals.unreadable) == 2
    for name, value in model.post_processor.state_dict().items():
        assert torch.allclose(value, new["state_dict"][f"post_processor.{name}"], equal_nan=True), name


@pytest.mark.usefixtures("keep_torch_threads")
def test_openvino_export_of_the_recalibrated_checkpoint_gives_the_same_labels(
    new_light: Path, recalibrated, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from anomalib_ext.models import TileOutlier

    output, _ = recalibrated
    by_edge = edge_labels(TileOutlier.load_from_checkpoint(output, visualizer=False), new_light / "test", tmp_path)
    normal = [label for name, label in by_edge.items() if not name.startswith(("colour", "missing", "scratch", "spot"))]
    defect = [label for name, label in by_edge.items() if name.startswith(("colour", "missing", "scratch", "spot"))]
    assert len(normal) == 8 and len(defect) == 8, by_edge
    assert sum(normal) <= 1 and all(defect), by_edge
    by_score = labels_by_score(capsys, output, new_light / "test", tmp_path / "scores")
    assert by_edge == {Path(path).name: label for path, label in by_score.items()}


@pytest.mark.usefixtures("keep_torch_threads")
def test_bad_input_is_a_one_line_error(
    trained: Path, new_light: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    few = tmp_path / "few"
    for path in sorted((new_light / "normals").glob("*"))[:3]:
        few.mkdir(exist_ok=True)
        shutil.copy(path, few / path.name)
    (few / "broken.png").write_bytes(b"")
    not_a_model = tmp_path / "weights.ckpt"
    torch.save({"weights": torch.zeros(3)}, not_a_model)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    exists = tmp_path / "exists.ckpt"
    exists.write_bytes(b"x")
    normals = new_light / "normals"
    cases = {
        "holds no images": ("--ckpt_path", trained, "--normals", empty),
        "needs at least 5": ("--ckpt_path", trained, "--normals", few),
        "not a Lightning checkpoint": ("--ckpt_path", not_a_model, "--normals", normals),
        "not a checkpoint torch can read": ("--ckpt_path", text, "--normals", normals),
        "checkpoint not found": ("--ckpt_path", tmp_path / "missing.ckpt", "--normals", normals),
        "no such file or folder": ("--ckpt_path", trained, "--normals", tmp_path / "nowhere"),
        "pass --overwrite": ("--ckpt_path", trained, "--normals", normals, "--output", exists),
        "the trained checkpoint itself": ("--ckpt_path", trained, "--normals", normals, "--output", trained),
    }
    for expected, args in cases.items():
        status, _, err = run_cli(capsys, "recalibrate", *args, "--device", "cpu")
        assert status == 2 and expected in err and len(err.strip().splitlines()) == 1, (expected, err)
    status, _, err = run_cli(capsys, "recalibrate", *cases["needs at least 5"], "--device", "cpu")
    assert "3 readable" in err and "broken.png" in err, err
    assert exists.read_bytes() == b"x"


SHADOW = 0.4  # the light left on the shaded half


def shadow_over_half(source: Path, target: Path) -> None:
    """The image with a hard shadow over its right half (a lamp to one side, something in its way)."""
    from PIL import Image

    image = np.asarray(Image.open(source).convert("RGB"), dtype=np.float32) / 255
    light = np.where(np.arange(image.shape[1]) < image.shape[1] // 2, 1.0, SHADOW).astype(np.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(image * light[None, :, None], 0, 1) * 255).round().astype(np.uint8)).save(target)


@pytest.mark.usefixtures("keep_torch_threads")
def test_extend_bank_makes_a_shadow_over_half_the_part_rank_again_and_thresholds_from_held_out_scores(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A change across the image (a shadow's edge) puts normal tiles where the bank has none like them: normals
    then outrank defects, which no threshold can fix. With ``--extend-bank`` the ten new normals join the bank,
    the ranking comes back, and the thresholds come from their leave-one-out scores (against a bank holding
    themselves they would score 0)."""
    from anomalib_ext.commands.recalibrate import recalibrate, recalibrate_checkpoint, score_normals
    from anomalib_ext.models import Reconstruction, TileOutlier

    category = trained.parent / "synthetic" / "test"
    shadow = tmp_path / "shadow"
    good = sorted((category / "good").glob("*.png"))
    for path in good[:10]:
        shadow_over_half(path, shadow / "normals" / path.name)
    for path in good[10:]:
        shadow_over_half(path, shadow / "test" / "good" / path.name)
    for path in sorted(category.glob("*/*.png")):
        if path.parent.name != "good":
            shadow_over_half(path, shadow / "test" / "defect" / f"{path.parent.name}_{path.name}")
    normal_paths = sorted((shadow / "test" / "good").glob("*.png"))
    defect_paths = sorted((shadow / "test" / "defect").glob("*.png"))

    def raw(model: TileOutlier, paths: list[Path]) -> np.ndarray:
        return np.array(score_normals(model, paths).scores)

    fitted = TileOutlier.load_from_checkpoint(trained, visualizer=False)
    assert raw(fitted, normal_paths).max() > raw(fitted, defect_paths).min(), "the shadow must break the ranking first"

    output = tmp_path / "extended.ckpt"
    _, recalibration = recalibrate_checkpoint(trained, shadow / "normals", output, extend_bank=True)
    assert recalibration.bank_images == 10 and "memory bank: the 10 new normals added" in "\n".join(
        recalibration.summary()
    )

    extended = TileOutlier.load_from_checkpoint(output, visualizer=False)
    normal_scores, defect_scores = raw(extended, normal_paths), raw(extended, defect_paths)
    assert normal_scores.max() < defect_scores.min(), (normal_scores, defect_scores)
    # the thresholds rest on held-out scores: the same normals scored against the bank that holds them are 0
    in_bank = raw(extended, sorted((shadow / "normals").glob("*.png")))
    assert in_bank.max() < 1e-4 < min(recalibration.normals.scores), (in_bank, recalibration.normals.scores)
    by_score = labels_by_score(capsys, output, shadow / "test", tmp_path / "labels")
    normal, defect = split(by_score)
    assert sum(normal) <= 1 and sum(defect) == len(defect), (normal, defect)

    # the extended bank goes into the OpenVINO graph: the edge labels what the checkpoint labels
    by_edge = edge_labels(extended, shadow / "test", tmp_path)
    assert by_edge == {Path(path).name: label for path, label in by_score.items()}

    # what the checkpoint changed: the post-processor's buffers and the bank, ten more tiles at each grid position
    old = torch.load(trained, map_location="cpu", weights_only=False)["state_dict"]
    new = torch.load(output, map_location="cpu", weights_only=False)
    changed = {
        key
        for key in old
        if old[key].shape != new["state_dict"][key].shape or not torch.equal(old[key], new["state_dict"][key])
    }
    assert changed - {"model.memory_bank"} and all(
        key.startswith("post_processor.") for key in changed - {"model.memory_bank"}
    ), changed
    assert new["state_dict"]["model.memory_bank"].shape[2] == old["model.memory_bank"].shape[2] + 10
    assert new["anomalib_ext_recalibration"]["bank_images"] == 10

    with pytest.raises(ScoreError, match="no memory bank to extend"):
        recalibrate(Reconstruction(image_size=64, visualizer=False), shadow / "normals", extend_bank=True)


@pytest.mark.parametrize("rule", ["anchored", "upper"])
def test_a_change_of_gain_and_offset_is_undone_exactly(rule: str) -> None:
    """Scores that all moved by ``a * s + b`` (a pure change of scale) get the threshold and normalisation that
    give every image the normalised score and label it had, by either rule: ``upper`` when the fitted threshold sat
    at the top of the validation normals' window, ``anchored`` wherever it sat inside it (here: among the normals)."""
    from anomalib.data import InferenceBatch

    from anomalib_ext.models.components.thresholds import RobustThresholdPostProcessor, recalibrate_thresholds

    old_normals = torch.tensor([0.5, 0.8, 1.0, 1.1, 1.2, 1.4, 1.6, 1.7, 1.9, 2.4])
    processor = RobustThresholdPostProcessor()
    top, median = old_normals.max(), old_normals.median()
    q25, q75 = torch.quantile(old_normals, torch.tensor([0.25, 0.75]))
    # the validation set these statistics (``on_validation_epoch_end``); the threshold: the window's top for
    # ``upper``, a point inside it (at its 90 % quantile, as a synthetic-anomaly F1 optimum clamped there) for
    # ``anchored``
    processor.normal_score_median.fill_(float(median))
    processor.normal_score_iqr.fill_(float(q75 - q25))
    inside = torch.quantile(old_normals, 0.9)
    threshold = top + 0.5 * (top - median) if rule == "upper" else inside
    processor._image_threshold.fill_(float(threshold))
    processor.image_min.fill_(0.5)
    processor.image_max.fill_(6.0)
    probe = torch.tensor([0.5, 1.3, 2.0, 2.2, 2.5, 4.0, 6.0])
    before = processor(InferenceBatch(pred_score=probe.clone()))

    gain, offset = 3.0, 1.0
    values = recalibrate_thresholds(processor, gain * old_normals + offset, rule=rule)
    assert values["rule"] == rule
    after = processor(InferenceBatch(pred_score=gain * probe + offset))
    assert torch.allclose(after.pred_score, before.pred_score, atol=1e-5)
    assert torch.equal(after.pred_label, before.pred_label)
    assert values["after"]["_image_threshold"] == pytest.approx(gain * values["before"]["_image_threshold"] + offset)
    assert math.isnan(values["after"]["_pixel_threshold"]), "no map given: the pixel threshold is left alone"
    # the new normals' statistics replace the validation ones: a second recalibration starts from this condition
    assert float(processor.normal_score_median) == pytest.approx(gain * float(median) + offset)

    with pytest.raises(ValueError, match="at least 5"):
        recalibrate_thresholds(processor, torch.tensor([1.0, 2.0, float("nan"), 3.0, 4.0]))


def test_anchored_rule_keeps_a_fitted_threshold_inside_the_normals_and_falls_back_without_statistics() -> None:
    """Unchanged light: ``anchored`` gives about the fitted threshold back where ``upper`` lifts it above every
    normal (the defects scoring among the normals, which the fitted threshold caught, would be lost). It never
    leaves the new normals' window. A checkpoint without validation statistics (before 0.9.0) falls back to
    ``upper`` and says so."""
    from anomalib_ext.models.components.thresholds import RobustThresholdPostProcessor, recalibrate_thresholds

    generator = torch.Generator().manual_seed(1)
    validation = torch.randn(40, generator=generator)
    new_normals = torch.randn(10, generator=generator)

    def fitted(threshold: float) -> RobustThresholdPostProcessor:
        processor = RobustThresholdPostProcessor()
        processor.normal_score_median.fill_(float(validation.median()))
        q25, q75 = torch.quantile(validation, torch.tensor([0.25, 0.75]))
        processor.normal_score_iqr.fill_(float(q75 - q25))
        processor._image_threshold.fill_(threshold)
        return processor

    # 1.2: inside the validation normals' window (their 90 % quantile 1.17, maximum 2.41)
    anchored = recalibrate_thresholds(fitted(1.2), new_normals, rule="anchored")["after"]["_image_threshold"]
    upper = recalibrate_thresholds(fitted(1.2), new_normals, rule="upper")["after"]["_image_threshold"]
    top = float(new_normals.max())
    assert abs(anchored - 1.2) < 0.3 and anchored < upper and upper > top
    # far outside the new window on either side: clamped into it
    low = recalibrate_thresholds(fitted(-5.0), new_normals)["after"]["_image_threshold"]
    high = recalibrate_thresholds(fitted(50.0), new_normals)["after"]["_image_threshold"]
    assert low == pytest.approx(float(torch.quantile(new_normals, 0.9)))
    assert high == pytest.approx(upper)

    old = fitted(1.2)
    state = {key: value for key, value in old.state_dict().items() if not key.startswith("normal_score")}
    loaded = RobustThresholdPostProcessor()
    loaded.load_state_dict(state)  # a 0.8.0 checkpoint's post-processor: no statistics, no error
    values = recalibrate_thresholds(loaded, new_normals, rule="anchored")
    assert values["rule"].startswith("upper (") and values["after"]["_image_threshold"] == pytest.approx(upper)
