"""tools/benchmark.py end to end with its OpenVINO exports: ``--quick`` with seeds, validation draws, speeds and
resume, and ``--export-precision`` (f32 and INT8 rows beside the bare trunk). anomalib's PaDiM on the synthetic data;
the rest of the benchmark's tests: tests/test_benchmark.py."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

from tests.harness.benchmark_runs import REPO, run_benchmark

sys.path.insert(0, str(REPO / "tools"))


def test_quick_seeds_val_draws_speed_and_resume(tmp_path: Path) -> None:
    """--quick (OpenVINO on) with two seeds and two validation draws: runs, summary, speeds, resume."""
    out = tmp_path / "quick"
    completed = run_benchmark("--quick", "--model", "padim", "--seeds", "2", "--val-draws", "2", "--out", str(out))
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((row["model"], row["seed"]) for row in rows) == [("padim", "0"), ("padim", "1")]
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert float(row["image_auroc"]) > 0.9  # planted defects are easy for PaDiM
        assert float(row["pixel_auroc"]) > 0.9
        # the raw scores' AUROC depends on the model alone; clamping can only tie scores, never reorder them
        assert float(row["image_auroc_raw"]) > 0.9 and float(row["pixel_auroc_raw"]) > 0.9
        assert float(row["image_auroc_raw"]) >= float(row["image_auroc"]) - 0.02
        draws = json.loads(row["image_f1_draws"])
        assert len(draws) == 2
        assert draws[0] == pytest.approx(float(row["image_f1"]))  # draw 0 is the fitted model's own validation
        assert len(set(json.loads(row["image_threshold_draws"]))) == 2  # another draw, another threshold
        # both threshold rules from the same run: anomalib's PaDiM has the plain F1-optimal one only, and no
        # validation threshold beats the best threshold on the test set itself
        assert float(row["image_f1_f1_optimal"]) == pytest.approx(float(row["image_f1"]))
        assert float(row["image_f1_test_optimal"]) >= float(row["image_f1"]) - 1e-9
        assert float(row["image_f1_test_optimal"]) > 0.9  # AUROC > 0.9: some threshold separates well
        # one speed routine: same threads for torch and OpenVINO, f32, load average at timing
        assert row["torch_threads"] == row["openvino_threads"] == "1"
        # the load average is read when the timing starts (a number, recorded on both sides; the routine's own
        # reading is checked against a fake load in test_speed_routine_reports_threads_and_load_and_clamps_inputs)
        assert math.isfinite(float(row["torch_load_average_1min"]))
        assert math.isfinite(float(row["openvino_load_average_1min"]))
        assert float(row["openvino_max_score_diff"]) < 1e-3
        assert float(row["torch_images_per_s"]) > 0 and float(row["openvino_images_per_s"]) > 0
        run_dir = out / "cells" / "synthetic-mvtec__padim" / f"seed{row['seed']}"
        cell_result = json.loads((run_dir / "result.json").read_text())
        assert (cell_result["openvino_precision"], cell_result["openvino_inference_precision"]) == ("fp32", "f32")
        assert list((run_dir / "visuals").glob("*.png"))
    aurocs = [float(row["image_auroc"]) for row in rows]
    summary = list(csv.DictReader((out / "results_summary.csv").open()))
    assert len(summary) == 1 and summary[0]["runs"] == "2" and summary[0]["ok_runs"] == "2"
    assert float(summary[0]["image_auroc_mean"]) == pytest.approx(sum(aurocs) / 2)
    assert float(summary[0]["image_auroc_min"]) == pytest.approx(min(aurocs))
    table = (out / "results.md").read_text()
    assert "| padim (seed 1) |" in table
    assert "## Across seeds: mean ± std (min–max)" in table
    assert "| synthetic-mvtec | padim | 2/2 |" in table
    assert (out / "plots" / "accuracy_vs_openvino_synthetic-mvtec.png").stat().st_size > 0

    resumed = run_benchmark("--quick", "--val-draws", "2", "--resume", str(out))  # same settings, kept runs
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("kept from earlier run (ok)") == 2


def test_export_precisions_give_one_row_each_with_the_exported_models_auroc_and_the_trunk(tmp_path: Path) -> None:
    """--export-precision fp32,int8: per precision the OpenVINO speed and the exported model's own AUROC, beside
    the bare backbone trunk timed in the same cell."""
    out = tmp_path / "int8"
    completed = run_benchmark("--quick", "--model", "padim", "--export-precision", "int8,fp32", "--out", str(out))
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["openvino_precision"] for row in rows] == ["fp32", "int8"]  # fp32 first: the reference
    fp32, int8 = rows
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert float(row["openvino_images_per_s"]) > 0
        assert 0.0 <= float(row["openvino_image_auroc"]) <= 1.0 and 0.0 <= float(row["openvino_pixel_auroc"]) <= 1.0
        assert row["backbone_layer"] == "tf_efficientnet_lite0:blocks.4"  # the deepest of padim's layers
        assert float(row["openvino_fraction_of_backbone"]) == pytest.approx(
            float(row["openvino_images_per_s"]) / float(row["backbone_img_per_s"])
        )
    assert fp32["backbone_img_per_s"] == int8["backbone_img_per_s"]  # one trunk timing per cell
    # the trunk quantised whole, timed in the same interleaving: the ceiling of a model's INT8 speed-up
    assert float(int8["backbone_int8_speedup"]) == pytest.approx(
        float(int8["backbone_int8_img_per_s"]) / float(int8["backbone_img_per_s"])
    )
    assert int(int8["openvino_timed_passes"]) >= 1
    assert float(fp32["openvino_speedup_vs_fp32"]) == 1.0
    assert float(int8["openvino_speedup_vs_fp32"]) == pytest.approx(
        float(int8["openvino_images_per_s"]) / float(fp32["openvino_images_per_s"])
    )
    # the f32 export scores like torch, so its own AUROC is torch's; the torch columns repeat on the int8 row
    assert float(fp32["openvino_image_auroc"]) == pytest.approx(float(fp32["image_auroc"]), abs=1e-3)
    assert float(fp32["openvino_pixel_auroc"]) == pytest.approx(float(fp32["pixel_auroc"]), abs=1e-3)
    assert int8["image_auroc"] == fp32["image_auroc"]
    # the export's own labels: the f32 graph applies the threshold torch's F1 was computed with
    assert float(fp32["openvino_image_f1"]) == pytest.approx(float(fp32["image_f1"]), abs=1e-6)
    assert 0.0 <= float(int8["openvino_image_f1"]) <= 1.0
    # INT8 may cost a little accuracy, not the model: a scrambled quantisation falls towards 0.5
    assert float(int8["openvino_image_auroc"]) >= float(fp32["openvino_image_auroc"]) - 0.05
    assert float(int8["openvino_pixel_auroc"]) >= float(fp32["openvino_pixel_auroc"]) - 0.05
    assert float(int8["openvino_model_mb"]) < float(fp32["openvino_model_mb"])  # int8 weights
    table = (out / "results.md").read_text()
    assert "## OpenVINO exports" in table and "| synthetic-mvtec | padim | int8 |" in table
    exports = json.loads((out / "cells" / "synthetic-mvtec__padim" / "seed0" / "result.json").read_text())
    for export in exports["openvino_exports"]:  # where the time goes, per stage of the graph
        assert sum(export["openvino_stage_ms"].values()) > 0, export["openvino_stage_ms"]


@pytest.mark.parametrize("value", ["fp16", "fp32,fp32", ""])
def test_bad_export_precision_is_a_usage_error(value: str, capsys: pytest.CaptureFixture) -> None:
    from benchmark import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--quick", "--export-precision", value])
    assert "--export-precision" in capsys.readouterr().err
