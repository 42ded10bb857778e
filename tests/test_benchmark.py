"""tools/benchmark.py: argument parsing, dataset splits, fault isolation, reports, and the --quick run end to end.

Synthetic data only. The end-to-end test trains two small models, so it takes a minute or two on a free CPU.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "benchmark.py"
sys.path.insert(0, str(REPO / "tools"))

from benchmarking import report  # noqa: E402
from benchmarking.datasets import prepare_dice_split  # noqa: E402
from benchmarking.specs import SpecError, parse_dataset, parse_model, resolve_config_family  # noqa: E402


def run_benchmark(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


# ------------------------------------------------------------------------------------------------ specs
def test_short_names_map_to_the_offline_backbone() -> None:
    spec = parse_model("patchcore")
    assert spec.class_path == "anomalib.models.Patchcore"
    assert spec.init_args["backbone"] == "tf_efficientnet_lite0"
    assert spec.init_args["layers"] == ["blocks.2", "blocks.4"]


def test_model_options_label_and_class_path() -> None:
    spec = parse_model("small=padim:{n_features: 20, layers: [blocks.1, blocks.2]}")
    assert spec.label == "small"
    assert spec.init_args["n_features"] == 20
    assert spec.init_args["layers"] == ["blocks.1", "blocks.2"]
    assert spec.init_args["backbone"] == "tf_efficientnet_lite0"  # defaults kept
    spec = parse_model("anomalib.models.Dfm:{layer: blocks.4}")
    assert (spec.label, spec.init_args["layer"]) == ("dfm", "blocks.4")


def test_config_file_takes_the_model_section_and_ignores_data(tmp_path: Path) -> None:
    config = tmp_path / "mvtec.yaml"
    config.write_text(
        textwrap.dedent(
            """
            data:
              class_path: anomalib.data.MVTecAD
              init_args: {root: /nowhere, category: bottle}
            model:
              class_path: anomalib.models.Dfm
              init_args: {backbone: tf_efficientnet_lite0, layer: blocks.6}
            trainer: {max_epochs: 3, accelerator: gpu}
            """
        )
    )
    spec = parse_model(str(config))
    assert spec.class_path == "anomalib.models.Dfm"
    assert spec.init_args == {"backbone": "tf_efficientnet_lite0", "layer": "blocks.6"}
    assert spec.trainer == {"max_epochs": 3}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("no_such_model", "unknown model 'no_such_model'"), ("padim:{n_features: [1,", "not a YAML mapping")],
)
def test_bad_model_arguments_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment.replace("[", r"\[")):
        parse_model(text)


def test_config_family_picks_the_dataset_config_or_falls_back_to_mvtec() -> None:
    assert resolve_config_family("template_ssim", "dice", "dice").name == "dice.yaml"
    assert resolve_config_family("tile_outlier", "dice", "my_dice").name == "mvtec.yaml"  # no dice config
    with pytest.raises(SpecError, match="pass the config file explicitly"):
        resolve_config_family("dfkdm", "dice", "dice")  # backbone.yaml or lake.yaml: the user must choose


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        parse_model(str(tmp_path / "missing.yaml"))


def test_dataset_layouts_are_detected(mvtec_root: Path, dice_root: Path, tmp_path: Path) -> None:
    assert parse_dataset(str(mvtec_root / "synthetic")).kind == "mvtec"
    assert parse_dataset(str(dice_root)).kind == "dice"
    (tmp_path / "good").mkdir()
    assert parse_dataset(f"mine={tmp_path}:{{image_size: 64}}").to_dict() == {
        "label": "mine",
        "kind": "folder",
        "path": str(tmp_path.resolve()),
        "options": {"image_size": 64},
    }
    with pytest.raises(SpecError, match="unknown layout"):
        parse_dataset(str(tmp_path / "good"))
    with pytest.raises(SpecError, match="is not a directory"):
        parse_dataset(str(tmp_path / "absent"))


# ----------------------------------------------------------------------------------------------- splits
def _split_sources(split_dir: Path) -> dict[str, set[str]]:
    rows = list(csv.DictReader((split_dir / "split.csv").open()))
    groups: dict[str, set[str]] = {}
    for row in rows:
        groups.setdefault(row["split"], set()).add(row["source"])
    return groups


def test_dice_split_without_test_folder_is_by_session_and_disjoint(dice_root: Path, tmp_path: Path) -> None:
    """Like the real dice set: no test folder, so test normals come from a held-out session."""
    source = tmp_path / "dice"
    source.mkdir()
    for sub in ("train", "val"):
        (source / sub).symlink_to(dice_root / sub, target_is_directory=True)
    counts = prepare_dice_split(
        source, tmp_path / "split", {"val_sessions": ["25_10_21"], "test_sessions": ["16_09_21"]}
    )
    assert all(count > 0 for count in counts.values())
    groups = _split_sources(tmp_path / "split")
    all_normals = [groups["train/good"], groups["val/good"], groups["test/good"]]
    for index, first in enumerate(all_normals):
        for second in all_normals[index + 1 :]:
            assert not first & second
    assert not groups["val/anomalous"] & groups["test/anomalous"]
    assert all("_16_09_21_" in Path(path).name for path in groups["test/good"])
    assert all("_25_10_21_" in Path(path).name for path in groups["val/good"])
    assert (tmp_path / "split" / "test" / "good").is_dir()


def test_dice_split_keeps_copies_of_test_images_out_of_train_and_validation(dice_root: Path, tmp_path: Path) -> None:
    """The real set repeats images byte for byte across its two dark sessions (validation and test by default)."""
    import shutil

    from anomalib_ext.data.duplicates import file_digest

    source = tmp_path / "dice"
    shutil.copytree(dice_root / "train", source / "train")
    (source / "val").symlink_to(dice_root / "val", target_is_directory=True)
    for image in sorted((source / "train" / "good").rglob("*_16_09_21_*")):  # copies into a val and a train session
        for session in ("25_10_21", "26_01_22"):
            shutil.copy(image, image.with_name(f"copy_{image.stem.replace('16_09_21', session)}{image.suffix}"))
    prepare_dice_split(source, tmp_path / "split", {"val_sessions": ["25_10_21"], "test_sessions": ["16_09_21"]})
    groups = {name: {file_digest(path) for path in paths} for name, paths in _split_sources(tmp_path / "split").items()}
    held_out = groups["test/good"] | groups["test/anomalous"]
    assert not held_out & (groups.get("val/good", set()) | groups["train/good"])


def test_dice_split_rejects_unknown_options(dice_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown options"):
        prepare_dice_split(dice_root, tmp_path / "split", {"train_per_clas": 3})


# ------------------------------------------------------------------------------------------------ report
def test_report_keeps_failed_cells_and_writes_every_file(tmp_path: Path) -> None:
    cells = tmp_path / "cells"
    good = {"dataset": "d", "model": "a", "status": "ok", "image_auroc": 0.9, "image_f1": 0.8, "fit_seconds": 1.0}
    good.update(torch_images_per_s=10.0, openvino_images_per_s=20.0, n_test=10, n_train=5, n_val=4)
    bad = {"dataset": "d", "model": "b", "status": "timeout", "error": "killed after the 5 s time limit"}
    for name, row in (("d__a", good), ("d__b", bad)):
        (cells / name).mkdir(parents=True)
        (cells / name / "result.json").write_text(json.dumps(row))
    rows = report.write_reports(tmp_path, ["# title"], order=["d__b", "d__a"])
    assert [row["model"] for row in rows] == ["b", "a"]
    table = (tmp_path / "results.md").read_text()
    assert "b (**timeout**: killed after the 5 s time limit)" in table
    assert "| a | 0.900 | 0.800 |" in table
    assert (tmp_path / "plots" / "accuracy_vs_openvino_d.png").stat().st_size > 0
    assert (tmp_path / "plots" / "bars_d.png").stat().st_size > 0
    assert len(list(csv.DictReader((tmp_path / "results.csv").open()))) == 2


def test_resume_refuses_settings_that_change_the_numbers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import benchmark

    settings = benchmark.settings_from(benchmark.parse_args(["--max-epochs", "3"]))
    (tmp_path / benchmark.MANIFEST).write_text(json.dumps({"settings": settings, "datasets": [], "models": []}))
    assert benchmark.main(["--resume", str(tmp_path), "--max-epochs", "5"]) == 2
    assert "max_epochs: was 3, now 5" in capsys.readouterr().err
    assert benchmark.main(["--resume", str(tmp_path / "elsewhere")]) == 2
    assert "not a benchmark results folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------- process isolation
FAULTY_MODELS = """
import time


class Broken:
    def __init__(self, **kwargs):
        raise RuntimeError("this model is broken on purpose")


class Hangs:
    def __init__(self, **kwargs):
        time.sleep(600)
"""


def test_failing_and_hung_cells_are_recorded_and_the_run_goes_on(mvtec_root: Path, tmp_path: Path) -> None:
    (tmp_path / "faulty_models.py").write_text(FAULTY_MODELS)
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    out = tmp_path / "out"
    completed = run_benchmark(
        "--dataset",
        str(mvtec_root / "synthetic"),
        "--model",
        "faulty_models.Broken",
        "--model",
        "faulty_models.Hangs",
        "--time-limit",
        "90",
        "--out",
        str(out),
        env=env,
    )
    assert completed.returncode == 0, completed.stderr
    rows = {row["model"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert rows["broken"]["status"] == "error"
    assert "broken on purpose" in rows["broken"]["error"]
    assert rows["hangs"]["status"] == "timeout"
    # the same folder is never reused silently
    again = run_benchmark("--dataset", str(mvtec_root / "synthetic"), "--out", str(out))
    assert again.returncode == 2
    assert "--resume" in again.stderr


# ------------------------------------------------------------------------------------------- quick mode
def test_quick_mode_produces_csv_markdown_plots_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "quick"
    completed = run_benchmark("--quick", "--out", str(out))
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {row["model"] for row in rows} >= {"padim", "dfm"}
    for row in rows:
        if row["model"] not in ("padim", "dfm"):
            continue
        assert row["status"] == "ok", row["error"]
        assert 0.5 < float(row["image_auroc"]) <= 1.0  # planted defects are easy
        assert 0.0 <= float(row["image_f1"]) <= 1.0
        assert 0.0 <= float(row["pixel_auroc"]) <= 1.0
        assert 0.0 <= float(row["pixel_pro"]) <= 1.0
        for key in ("fit_seconds", "torch_images_per_s", "openvino_images_per_s", "peak_rss_mb", "openvino_model_mb"):
            assert float(row[key]) > 0, key
        visuals = list((out / "cells" / f"synthetic-mvtec__{row['model']}" / "visuals").glob("*.png"))
        assert visuals
    table = (out / "results.md").read_text()
    assert "image AUROC" in table
    assert "| padim |" in table
    assert (out / "plots" / "accuracy_vs_openvino_synthetic-mvtec.png").stat().st_size > 0
    assert (out / "plots" / "bars_synthetic-mvtec.png").stat().st_size > 0

    resumed = run_benchmark("--quick", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("kept from earlier run (ok)") == len(rows)
