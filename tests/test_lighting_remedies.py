"""Lighting remedies (issue 25): per-image photometric standardisation (``input_normalization: per_image``), the
controlled test-time lighting changes of ``--study light_changes`` and the recalibration arms of both lighting
studies (``tools/benchmark.py``)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anomalib_ext.models.components import InputNormalizer
from tests.harness.benchmark_runs import REPO
from tests.harness.benchmark_runs import run_benchmark as harness_run_benchmark

sys.path.insert(0, str(REPO / "tools"))

from benchmarking.studies import light_changes, lighting  # noqa: E402


def _environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "SENTRY_OPT_OUT": "1", "OMP_NUM_THREADS": "1"}


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    """The benchmark as tests/harness runs it, one thread per cell."""
    return harness_run_benchmark(*args, env=_environment())


def test_per_image_normalization_ignores_brightness_and_contrast() -> None:
    """``a * x + b`` per channel (gain, offset, a colour temperature's channel gains) gives the same input."""
    per_image = InputNormalizer.for_backbone("tf_efficientnet_lite0", "per_image")
    fixed = InputNormalizer.for_backbone("tf_efficientnet_lite0", "backbone")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.2
    changed = images * torch.tensor([0.8, 1.1, 1.3]).view(1, 3, 1, 1) + 0.05
    assert torch.allclose(per_image(images), per_image(changed), atol=1e-5)
    assert (fixed(images) - fixed(changed)).abs().max() > 0.1  # the fixed statistics do see the change
    standardised = per_image(images)
    assert torch.allclose(standardised.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(standardised.std(dim=(2, 3), correction=0), torch.ones(2, 3), atol=1e-4)
    assert torch.isfinite(per_image(torch.full((1, 3, 8, 8), 0.5))).all()  # a flat image stays finite
    traced = torch.jit.trace(per_image, images)  # no data-dependent branch: one traced graph for any input
    assert torch.allclose(traced(changed), per_image(changed), atol=1e-6)
    import openvino as ov

    exported = ov.Core().compile_model(ov.convert_model(per_image, example_input=images), "CPU")
    assert torch.allclose(torch.from_numpy(exported(changed.numpy())[0]), per_image(changed), atol=1e-5)


def test_flat_field_normalization_takes_out_a_smooth_light_fall_off() -> None:
    """A gain per channel leaves the ``flat_field`` input unchanged; a vignette (a smooth multiplicative field)
    moves it far less than it moves ``per_image``'s; a flat or black image stays finite; it traces and exports."""
    flat_field = InputNormalizer.for_backbone("tf_efficientnet_lite0", "flat_field")
    per_image = InputNormalizer.for_backbone("tf_efficientnet_lite0", "per_image")
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(2, 3, 16, 16, generator=generator)  # structure at every scale, as a part has
    images = (
        0.2
        + 0.3 * torch.nn.functional.interpolate(coarse, size=128, mode="bilinear")
        + 0.2 * torch.rand(2, 3, 128, 128, generator=generator)
    )
    gains = torch.tensor([0.8, 1.1, 1.3]).view(1, 3, 1, 1)
    assert torch.allclose(flat_field(images), flat_field(images * gains), atol=1e-4)
    vignetted = light_changes.change_light(images, "vignette")
    moved_flat = (flat_field(images) - flat_field(vignetted)).abs().mean()
    moved_per_image = (per_image(images) - per_image(vignetted)).abs().mean()
    assert moved_flat < 0.5 * moved_per_image, (moved_flat, moved_per_image)
    for plain in (torch.full((1, 3, 32, 32), 0.5), torch.zeros(1, 3, 32, 32)):
        assert torch.isfinite(flat_field(plain)).all()
    traced = torch.jit.trace(flat_field, images)
    assert torch.allclose(traced(vignetted), flat_field(vignetted), atol=1e-5)
    import openvino as ov

    exported = ov.Core().compile_model(
        ov.convert_model(flat_field, example_input=images), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    assert torch.allclose(torch.from_numpy(exported(vignetted.numpy())[0]), flat_field(vignetted), atol=1e-5)


def test_lighting_changes_are_documented_and_deterministic() -> None:
    image = torch.full((3, 9, 9), 0.5)
    assert torch.allclose(light_changes.change_light(image, "gamma1.4"), torch.full_like(image, 0.38), atol=2e-3)
    assert float(light_changes.change_light(image, "gain1.2").max()) == pytest.approx(0.6, abs=2e-3)
    warm = light_changes.change_light(image, "warm")
    assert warm[0].mean() > warm[1].mean() > warm[2].mean()  # red up, blue down
    vignette = light_changes.change_light(image, "vignette")
    assert float(vignette[:, 4, 4].mean()) == pytest.approx(0.5, abs=2e-3)  # the centre keeps its light
    assert float(vignette[:, 0, 0].mean()) == pytest.approx(0.5 * (1 - light_changes.VIGNETTE), abs=3e-3)
    assert torch.equal(light_changes.change_light(image, "unchanged"), image)
    for change in list(light_changes.CHANGES)[1:]:  # 8-bit values, the same every call
        out = light_changes.change_light(image, change)
        assert torch.allclose(out * 255, (out * 255).round(), atol=1e-4)
        assert torch.equal(out, light_changes.change_light(image, change))


def test_model_trained_with_per_image_normalization_ranks_a_planted_defect_above_every_normal(tmp_path: Path) -> None:
    """The config option reaches the model through anomalib's CLI; the fitted model still separates defects."""
    import numpy as np
    from PIL import Image

    from anomalib_ext.commands.recalibrate import score_normals
    from anomalib_ext.commands.score import load_model
    from anomalib_ext.data.synthetic import make_mvtec_dataset

    category = make_mvtec_dataset(tmp_path / "data", image_size=64, n_train=16, n_test_good=6, n_test_per_defect=2)
    command = [str(Path(sys.executable).parent / "anomalib"), "fit", "--config"]
    command += [str(REPO / "configs" / "tile_outlier" / "mvtec.yaml"), "--trainer.accelerator", "cpu"]
    command += ["--data.init_args.root", str(category.parent), "--data.init_args.category", category.name]
    command += ["--model.init_args.input_normalization", "per_image", "--model.init_args.image_size", "64"]
    command += ["--model.init_args.tiling.tile_size", "16", "--model.init_args.layers", "[blocks.1, blocks.2]"]
    done = subprocess.run(command, cwd=tmp_path, env=_environment(), capture_output=True, text=True, timeout=600)  # noqa: S603
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    checkpoint = sorted(tmp_path.rglob("*.ckpt"))[-1]
    model, _ = load_model(checkpoint, None)
    assert model.model.normalize.per_image
    normal = score_normals(model, category / "test" / "good").scores
    good = sorted((category / "test" / "good").iterdir())[0]
    pixels = np.array(Image.open(good).convert("RGB"))
    pixels[24:36, 24:36] = 255 - pixels[24:36, 24:36]  # a 12 px inverted patch: a clear, local defect
    planted = tmp_path / "planted" / "defect.png"
    planted.parent.mkdir()
    Image.fromarray(pixels).save(planted)
    [defect_score] = score_normals(model, planted).scores
    assert len(normal) == 6
    assert defect_score > max(normal), (defect_score, sorted(normal))
    defective = [
        score
        for folder in sorted((category / "test").iterdir())
        if folder.name != "good"
        for score in score_normals(model, folder).scores
    ]
    above = sum(score > max(normal) for score in defective)
    assert above >= 0.75 * len(defective), (sorted(normal), sorted(defective))  # the synthetic defects too, mostly


def test_light_changes_study_tests_one_fitted_model_under_every_change(mvtec_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "light"
    completed = run_benchmark(
        *("--dataset", f"d={mvtec_root / 'synthetic'}:{{val_split_ratio: 0.6}}", "--model"),
        *("dfkdm=configs/dfkdm/backbone.yaml", "--study", "light_changes", "--no-openvino", "--image-size", "64"),
        *("--speed-images", "2", "--visuals", "0", "--max-epochs", "1", "--out", str(out)),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = {row["model"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert sorted(rows) == ["dfkdm@none", "dfkdm@per_image"]
    results = {
        json.loads(path.read_text())["model"]: json.loads(path.read_text())
        for path in (out / "cells").rglob("result.json")
    }
    for result in results.values():
        assert result["status"] == "ok", result.get("error")
        assert set(result["light_changes"]) == set(light_changes.CHANGES)
        for figures in result["light_changes"].values():
            assert 0 <= figures["plain"]["image_f1"] <= 1 and figures["recalibrated"]["normals"] >= 5
            # every rule scored on the same test scores; the default one is what "recalibrated" holds
            by_rule = figures["recalibrated_by_rule"]
            assert set(by_rule) == {"anchored", "upper"} and figures["recalibrated"]["rule"] == "anchored"
            assert by_rule["anchored"]["image_f1"] == figures["recalibrated"]["image_f1"]
            assert by_rule["anchored"]["image_threshold"] <= by_rule["upper"]["image_threshold"]
    per_image = results["dfkdm@per_image"]["light_changes"]
    reference = per_image["unchanged"]["plain"]["image_auroc"]
    for change in ("gain0.8", "warm", "cold"):  # affine per channel: per_image sees (almost) the same image
        assert per_image[change]["plain"]["image_auroc"] == pytest.approx(reference, abs=0.011)
    unchanged = results["dfkdm@none"]["light_changes"]["unchanged"]["plain"]
    assert unchanged["image_auroc"] == pytest.approx(float(rows["dfkdm@none"]["image_auroc_raw"]), abs=1e-6)
    report = (out / "results.md").read_text()
    assert "## Study: controlled lighting changes" in report
    assert "| d | dfkdm | per_image+recalibration | 1 |" in report and "worst ΔF1" in report
    assert "| d | dfkdm | recalibration:upper | 1 |" in report


def test_light_changes_report_reads_the_bank_arms_from_their_own_scores() -> None:
    """A bank model's ``+bank`` figures come from a second test pass (the bank took the normals): the report shows
    them in both tables, apart from the plain recalibration whose AUROC is the model arm's."""
    figures = {
        "plain": {"image_f1": 0.5, "image_auroc": 0.6},
        "recalibrated": {"image_f1": 0.7, "image_auroc": 0.6},
        "bank": {"image_f1": 0.9, "image_auroc": 0.95},
    }
    row = {"status": "ok", "dataset": "d", "model": "tile_outlier@none", "n_test": 10, "n_test_anomalous": 5}
    report = "\n".join(light_changes.report([{**row, "light_changes": dict.fromkeys(light_changes.CHANGES, figures)}]))
    changes = len(light_changes.CHANGES)
    assert "| d | tile_outlier | recalibration | 1 | " + " | ".join(["0.700"] * changes) in report
    assert "| d | tile_outlier | recalibration+bank | 1 | " + " | ".join(["0.900"] * changes) in report
    assert "| d | tile_outlier | recalibration+bank | 1 | " + " | ".join(["0.950"] * changes) + " |" in report
    assert "per_image+recalibration+bank" not in report  # arms without figures are left out


def test_lighting_study_recalibrates_on_dark_pool_normals_and_takes_per_image(dice_root: Path, tmp_path: Path) -> None:
    from anomalib.data.utils import LabelName

    from anomalib_ext.data import Dice
    from anomalib_ext.data.dice import HOLDOUT_SESSIONS

    datamodule = Dice(root=dice_root, train_sessions=list(lighting.BRIGHT_SESSIONS), num_workers=0)
    picked = lighting.dark_training_normals(datamodule, seed=0)
    tables = datamodule.split_samples()
    samples = Dice(root=dice_root, num_workers=0).split_samples()["train"].set_index("image_path")
    assert len(picked) == lighting.RECALIBRATION_NORMALS
    assert not set(picked) & set(tables["test"].image_path)  # never a test image
    assert not set(picked) & set(tables["train"].image_path)  # not what the bright arm trains on
    assert set(samples.loc[picked].session) <= set(HOLDOUT_SESSIONS)
    assert (samples.loc[picked].label_index == LabelName.NORMAL).all()
    assert datamodule.train_sessions == lighting.BRIGHT_SESSIONS  # the datamodule's own options are restored

    out = tmp_path / "out"
    completed = run_benchmark(
        *("--dataset", f"dice={dice_root}", "--model", "dfkdm=configs/dfkdm/backbone.yaml", "--study", "lighting"),
        *("--arms", "bright", "bright+recalibration", "bright+per_image", "--no-openvino", "--image-size", "64"),
        *("--speed-images", "2", "--visuals", "0", "--max-epochs", "1", "--out", str(out)),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert not (out / "histaugan").exists()  # no HistAuGAN arm, no generator trained
    results = {
        json.loads(path.read_text())["model"]: json.loads(path.read_text())
        for path in (out / "cells").rglob("result.json")
    }
    assert sorted(results) == ["dfkdm@bright", "dfkdm@bright+per_image", "dfkdm@bright+recalibration"]
    assert all(result["status"] == "ok" for result in results.values())
    recalibrated = results["dfkdm@bright+recalibration"]
    assert recalibrated["recalibration_normals"] == lighting.RECALIBRATION_NORMALS
    assert recalibrated["recalibration_threshold_after"] != recalibrated["recalibration_threshold_before"]
    assert recalibrated["image_threshold"] != results["dfkdm@bright"]["image_threshold"]
    by_rule = recalibrated["recalibration_thresholds_by_rule"]
    assert recalibrated["recalibration_rule"] == "anchored" and set(by_rule) == {"anchored", "upper"}
    assert by_rule["anchored"] == pytest.approx(recalibrated["recalibration_threshold_after"])
    assert recalibrated["image_f1_by_rule"]["anchored"] == pytest.approx(recalibrated["image_f1"], abs=1e-6)
    specs = [json.loads(path.read_text())["model"] for path in (out / "cells").rglob("cell.json")]
    per_image = next(spec for spec in specs if spec["label"] == "dfkdm@bright+per_image")
    assert lighting.model_for_cell(per_image)["init_args"]["input_normalization"] == "per_image"
    assert results["dfkdm@bright+per_image"]["image_threshold"] != results["dfkdm@bright"]["image_threshold"]
    assert "+recalibration" in (out / "results.md").read_text()
    assert "| bright+recalibration:upper |" in (out / "results.md").read_text()


def test_lighting_bank_arm_adds_the_dark_normals_to_the_bank_and_refuses_a_model_without_one(
    dice_root: Path, tmp_path: Path
) -> None:
    """``bright+recalibration+bank``: the recalibration normals join TileOutlier's bank before the test (so the speed
    and export stages time the larger bank); a model without a bank is refused before any training."""
    datasets = [{"label": "dice", "kind": "dice", "path": str(dice_root), "options": {}}]
    dfkdm = {"label": "dfkdm", "class_path": "anomalib_ext.models.Dfkdm", "init_args": {}}
    _, arms = lighting.expand(datasets, [dfkdm], {"arms": ["bright+recalibration+bank"], "out_dir": str(tmp_path)})
    assert arms[0]["lighting_recalibration"] and arms[0]["lighting_extend_bank"]
    with pytest.raises(ValueError, match="has no memory bank: no bright\\+recalibration\\+bank arm"):
        lighting.model_for_cell(arms[0])

    out = tmp_path / "out"
    completed = run_benchmark(
        *("--dataset", f"dice={dice_root}", "--model", "tile_outlier=configs/tile_outlier/mvtec.yaml"),
        *("--study", "lighting", "--arms", "bright+recalibration+bank", "--no-openvino", "--image-size", "64"),
        *("--speed-images", "2", "--visuals", "0", "--out", str(out)),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (result_path,) = (out / "cells").rglob("result.json")
    result = json.loads(result_path.read_text())
    assert result["status"] == "ok" and result["model"] == "tile_outlier@bright+recalibration+bank"
    assert result["recalibration_bank_images"] == lighting.RECALIBRATION_NORMALS
    before, after = result["memory_bank_values_before"], result["memory_bank_values_after"]
    assert after > before > 0
    assert "| bright+recalibration+bank |" in (out / "results.md").read_text()


def test_lighting_arms_are_checked_and_fused_takes_per_image() -> None:
    from benchmarking import studies

    from anomalib_ext.models import Fused, TeacherStudent

    datasets = [{"label": "d", "kind": "mvtec", "path": "unused", "options": {}}]
    models = [{"label": "m", "class_path": "anomalib_ext.models.Dfkdm", "init_args": {}}]
    _, arms = studies.expand("light_changes", datasets, models, {})
    assert [arm["label"] for arm in arms] == ["m@none", "m@per_image"]
    assert light_changes.model_for_cell(arms[1])["init_args"]["input_normalization"] == "per_image"
    with pytest.raises(ValueError, match="unknown arm"):
        studies.expand("light_changes", datasets, models, {"arms": ["gamma"]})
    with pytest.raises(ValueError, match="MVTec or folder"):
        studies.expand("light_changes", [{**datasets[0], "kind": "dice"}], models, {})
    with pytest.raises(ValueError, match="unknown arm"):
        studies.expand("lighting", [{**datasets[0], "kind": "dice"}], models, {"arms": ["dark"], "out_dir": "x"})
    autoencoder = {
        "label": "a",
        "class_path": "anomalib_ext.models.Reconstruction",
        "init_args": {},
        "light_arm": "per_image",
    }
    with pytest.raises(ValueError, match="no input_normalization"):
        light_changes.model_for_cell(autoencoder)  # an autoencoder from scratch has no backbone to standardise for
    assert Fused(image_size=64, input_normalization="per_image").model.normalize.per_image
    student = {**autoencoder, "class_path": "anomalib_ext.models.TeacherStudent", "light_arm": "flat_field"}
    assert light_changes.model_for_cell(student)["init_args"]["input_normalization"] == "flat_field"
    flat_student = TeacherStudent(image_size=64, input_normalization="flat_field").model
    assert flat_student.normalize.flat_field  # one normaliser: teacher and student see the same input
    with pytest.raises(ValueError, match="input_normalization must be one of"):
        TeacherStudent(image_size=64, input_normalization="flat")
    import benchmark

    with pytest.raises(SystemExit):  # --arms without a study that has arms is a usage error
        benchmark.parse_args(["--arms", "bright"])
    assert benchmark.parse_args(["--study", "light_changes", "--arms", "per_image"]).arms == ["per_image"]
